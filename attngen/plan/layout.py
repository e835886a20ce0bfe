"""Chunks of a tree's flattened KV, and the node pieces they hold.

**Chunking rule** (node-aware packing). Nodes are visited in preorder. A node that fits
entirely in the open chunk joins it; otherwise it starts a fresh chunk and is cut into
``ceil(tokens / chunk)`` pieces, the last of which stays open. So a node is split over
the fewest chunks possible, small nodes (speculative token trees, short thoughts) share
chunks, and a chunk spans nodes only when they fit whole, which keeps every chunk's
query set close to the queries that need all of it. Empty nodes take no space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attngen.tree import TreeBatch


@dataclass(frozen=True, slots=True)
class _Chunking:
    """Chunks of the flattened KV (they tile it, in order) and the node pieces they hold,
    sorted by chunk."""

    chunk: int
    start: np.ndarray  # [n_chunks] flattened index of the first token
    length: np.ndarray  # [n_chunks]
    piece_chunk: np.ndarray  # [n_pieces]
    piece_rank: np.ndarray  # preorder rank of the piece's node
    piece_offset: np.ndarray  # first token of the piece within its node
    piece_len: np.ndarray
    piece_local: np.ndarray  # first token of the piece within its chunk

    @property
    def n_chunks(self) -> int:
        return len(self.start)

    def keys(self) -> np.ndarray:
        """int64 [n_chunks, 5] per chunk: (first piece's node rank, its offset, last
        piece's node rank, its end, length), which identifies a chunk's content across
        token appends that do not touch it. Ascending in the first two columns."""
        count = np.bincount(self.piece_chunk, minlength=self.n_chunks)
        last = np.cumsum(count) - 1
        first = last - count + 1
        ends = self.piece_offset + self.piece_len
        cols = (self.piece_rank[first], self.piece_offset[first], self.piece_rank[last], ends[last], self.length)
        return np.stack(cols, axis=1)


@dataclass(frozen=True, slots=True)
class _KvNodes:
    """The nodes that hold KV (non-empty), in preorder: the ones the packing rule places."""

    rank: np.ndarray  # preorder rank
    size: np.ndarray  # tokens
    end: np.ndarray  # flattened index one past the node's last token

    @staticmethod
    def of(tree: TreeBatch) -> _KvNodes:
        sizes = tree.tokens[tree.order]
        rank = (sizes > 0).nonzero()[0]
        size = sizes[rank]
        return _KvNodes(rank, size, size.cumsum())


@dataclass(frozen=True, slots=True)
class _Placements:
    """Where the packing rule puts each node of a :class:`_KvNodes` for each of several
    chunk sizes, side by side (one row per chunk size), and the chunks that result: those
    of every chunk size in one array, chunk size ``k``'s at ``bounds[k]:bounds[k + 1]``
    (they tile the flattened KV in order)."""

    chunks: tuple[int, ...]  # [K] the chunk sizes
    first: np.ndarray  # [K, nodes] the node's first chunk, counted within its chunk size's
    pieces: np.ndarray  # [K, nodes] chunks the node spans
    local: np.ndarray  # [K, nodes] the node's first token within its first chunk
    start: np.ndarray  # [chunks] flattened index of the chunk's first token
    length: np.ndarray  # [chunks]
    bounds: np.ndarray  # [K + 1] where each chunk size's chunks begin, then their end

    def one(self, k: int) -> _Placements:
        """Chunk size ``k``'s placement alone."""
        lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
        return _Placements(
            self.chunks[k : k + 1], self.first[k : k + 1], self.pieces[k : k + 1], self.local[k : k + 1],
            self.start[lo:hi], self.length[lo:hi], np.array([0, hi - lo]),
        )


def _place(nodes: _KvNodes, chunk: int) -> _Placements:
    """The placement for one chunk size (see :func:`_places`)."""
    return _places(nodes, (chunk,))


def _places(nodes: _KvNodes, chunks: tuple[int, ...]) -> _Placements:
    """Implements the packing rule of the module docstring for each of ``chunks``, side by
    side. A node that starts a chunk leaves its last piece open; the nodes after it join
    that chunk while they fit, so the next node to start a chunk is one search in the
    token prefix sums away, and the only loop steps from one such node to the next."""
    size, end = nodes.size, nodes.end
    n, chunk = len(size), np.asarray(chunks, dtype=np.int64)[:, None]  # [chunkings, 1]
    kv_start = end - size
    pieces = -(-size // chunk)  # [chunkings, nodes]
    # the chunk a starting node leaves open ends at kv_start + pieces * chunk: the nodes
    # that end by then join it
    next_start = end.searchsorted(kv_start + pieces * chunk, "right").tolist()
    starts = bytearray(pieces.size)  # [chunking, node]: 1 where the node starts a chunk
    for k, row in enumerate(next_start):
        i = 0
        while i < n:
            starts[k * n + i] = 1
            i = row[i]
    # chunks each node opens
    opens = np.where(np.frombuffer(starts, dtype=np.bool_).reshape(pieces.shape), pieces, 0)
    pieces = np.maximum(opens, 1)  # a node that joins a chunk fits whole in it
    first = opens.cumsum(axis=1) - pieces
    counts = opens.sum(axis=1)
    bounds = np.concatenate(([0], counts.cumsum()))
    # chunk first + k of a node that opens chunks starts at the node's token k * chunk
    start = (kv_start - first * chunk).reshape(-1).repeat(opens.reshape(-1))
    start += (np.arange(len(start)) - bounds[:-1].repeat(counts)) * chunk.reshape(-1).repeat(counts)
    local = kv_start - start[first + bounds[:-1, None]]
    # each chunk ends where the next starts, the last of each chunking at the KV's end
    length = np.empty_like(start)
    length[:-1] = start[1:]
    length[bounds[1:][counts > 0] - 1] = end[-1] if n else 0
    length -= start
    return _Placements(tuple(chunks), first, pieces, local, start, length, bounds)


def _chunk_layout(tree: TreeBatch, chunk: int) -> _Chunking:
    """Cut the flattened KV of ``tree`` into chunks and its nodes into pieces."""
    nodes = _KvNodes.of(tree)
    return _pieces(nodes, _place(nodes, chunk))


def _pieces(nodes: _KvNodes, place: _Placements) -> _Chunking:
    """The chunking of ``place`` (of one chunk size), with each node cut into one piece per
    chunk it spans."""
    (chunk,), (first,), (pieces,), (local,) = place.chunks, place.first, place.pieces, place.local
    piece_node = np.arange(len(pieces)).repeat(pieces)
    k = np.arange(len(piece_node)) - (pieces.cumsum() - pieces)[piece_node]
    offset = k * chunk
    return _Chunking(
        chunk,
        place.start,
        place.length,
        first[piece_node] + k,
        nodes.rank[piece_node],
        offset,
        np.minimum(chunk, nodes.size[piece_node] - offset),
        local[piece_node],
    )

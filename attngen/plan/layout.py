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
class _Placement:
    """Where the packing rule puts each node of a :class:`_KvNodes` for one chunk size,
    and the chunks that result (they tile the flattened KV in order)."""

    chunk: int
    first: np.ndarray  # [nodes] the node's first chunk
    pieces: np.ndarray  # [nodes] chunks the node spans
    local: np.ndarray  # [nodes] the node's first token within its first chunk
    start: np.ndarray  # [n_chunks] flattened index of the chunk's first token
    length: np.ndarray  # [n_chunks]


def _place(nodes: _KvNodes, chunk: int) -> _Placement:
    """The placement for one chunk size (see :func:`_places`)."""
    return _places(nodes, (chunk,))[0]


def _places(nodes: _KvNodes, chunks: tuple[int, ...]) -> list[_Placement]:
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
    return [
        _Placement(c, first[k], pieces[k], local[k], start[lo:hi], length[lo:hi])
        for k, (c, lo, hi) in enumerate(zip(chunks, bounds[:-1], bounds[1:], strict=True))
    ]


def _chunk_layout(tree: TreeBatch, chunk: int) -> _Chunking:
    """Cut the flattened KV of ``tree`` into chunks and its nodes into pieces."""
    nodes = _KvNodes.of(tree)
    return _pieces(nodes, _place(nodes, chunk))


def _pieces(nodes: _KvNodes, place: _Placement) -> _Chunking:
    """The chunking of ``place``, with each node cut into one piece per chunk it spans."""
    piece_node = np.arange(len(place.pieces)).repeat(place.pieces)
    k = np.arange(len(piece_node)) - (place.pieces.cumsum() - place.pieces)[piece_node]
    offset = k * place.chunk
    return _Chunking(
        place.chunk,
        place.start,
        place.length,
        place.first[piece_node] + k,
        nodes.rank[piece_node],
        offset,
        np.minimum(place.chunk, nodes.size[piece_node] - offset),
        place.local[piece_node],
    )

"""Scratch (session 46): the paged Gluon kernel alone, against the contiguous one."""
import json, sys
import torch
import attngen
from attngen.bench_tree import _graph_time_us, node_paged_cache
from attngen.cost import HeadLayout
from attngen.plan import plan_tree
from attngen.spec import parse_spec
from attngen.workloads import WORKLOADS
from attngen.tree import make_page_table, paged_copy, physical_slots

def spec(kv, page):
    topo = {"kind": "tree", "queries": "node"} | ({"kv_layout": "paged", "page_size": page} if page else {})
    return parse_spec({"name": f"var_{kv}_{page or 0}", "heads": {"q": 32, "kv": kv}, "head_dim": 128, "dtype": "bf16", "topology": topo})

for case in sys.argv[1:]:
    name, kv = case.split(":"); kv = int(kv)
    flat, paged = attngen.load(spec(kv, None)), attngen.load(spec(kv, 16))
    tree = WORKLOADS[name]().tree
    dev = torch.device("cuda")
    plan = plan_tree(tree, heads=HeadLayout(heads_q=32, heads_kv=kv), device=dev)
    q = torch.randn(tree.n_queries, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(tree.n_kv, kv, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    layouts = {}
    for label, seed in (("table in order", None), ("table shuffled", 1)):
        table = make_page_table(tree.n_kv, 16, seed=seed)
        where = physical_slots(table, tree.n_kv, 16)
        layouts[label] = (paged_copy(k, where, len(table), 16), paged_copy(v, where, len(table), 16),
                          {"table": torch.from_numpy(table).to(dev), "table_page": 16})
    ks, vs, slots = node_paged_cache(tree, k, v, 16)
    layouts["node slots"] = (ks, vs, {"table": slots, "table_page": 1})
    t = plan.tensors()
    o_part = torch.zeros(plan.n_partials, 32, 128, device=dev); lse_part = torch.empty(plan.n_partials, 32, device=dev)
    qg = plan.queries_per_group
    flat._launch_gluon(q, k, v, t, o_part, lse_part, plan.n_dense, qg)
    ref = o_part.clone()
    row = {"case": case, "kernel contiguous": round(_graph_time_us(lambda: flat._launch_gluon(q, k, v, t, o_part, lse_part, plan.n_dense, qg)), 2)}
    for label, (kc, vc, kw) in layouts.items():
        fn = lambda kc=kc, vc=vc, kw=kw: paged._launch_gluon(q, kc, vc, t, o_part, lse_part, plan.n_dense, qg, **kw)
        o_part.zero_(); fn(); torch.cuda.synchronize()
        row[label + " eq"] = bool(torch.equal(o_part, ref))
        row["kernel " + label] = round(_graph_time_us(fn), 2)
    row["call contiguous"] = round(_graph_time_us(lambda: flat.attention(q, k, v, plan)), 2)
    row["call node slots"] = round(_graph_time_us(lambda: paged.attention(q, ks, vs, plan, slots=slots)), 2)
    print(json.dumps(row), flush=True)

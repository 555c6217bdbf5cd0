"""Candidate memory/speed patches to stackllama/ppo, measured WITHOUT editing it (monkeypatched here).

    python bench/ppo_patch_experiment.py --make-spec /tmp/ppo_spec      # spec_lora.json, spec_full.json (3 steps)
    python bench/ppo_patch_experiment.py VARIANT /tmp/ppo_spec/spec_lora.json /tmp/out.json

VARIANT is a name containing any of: ``rows`` (no-grad pass: log-prob + entropy fused per
episode, policy logits freed before the reference pass), ``headrows`` (no-grad pass: LM head
applied one episode at a time, never a (b, R, V) tensor), ``chunk`` (training log-probs per
episode under torch.utils.checkpoint), ``mallopt`` (glibc M_MMAP_THRESHOLD = 1 MiB, so freed
slabs return to the OS), ``fused`` / ``foreach`` (AdamW variants); ``base`` = none.
Prints episodes/s, peak RSS, pre-load RSS, first-step RSS per phase and the time split
(bench_ppo.py's "ours" worker does the run).
"""
import sys, json, functools, os
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if sys.argv[1] == "--make-spec":
    import bench_ppo
    out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
    spec = bench_ppo.prepare(bench_ppo.parse_args(["--steps", "3"]), out)
    for ft in ("lora", "full"):
        (out / f"spec_{ft}.json").write_text(json.dumps({**spec, "finetune": ft}))
    sys.exit(0)
import torch
from collections import defaultdict
variant = sys.argv[1]; spec_path = sys.argv[2]; out_path = sys.argv[3]
from stackllama.ppo import core
from stackllama.ppo.trainer import PPOTrainer

@torch.no_grad()
def forward_no_grad_rows(self, ro):
    out = defaultdict(list)
    n = int(self.cfg.mini_batch_size); Q = ro.query_len
    for s in range(0, ro.input_ids.shape[0], n):
        ids, att, resp = ro.input_ids[s:s+n], ro.attention_mask[s:s+n], ro.response_ids[s:s+n]
        logits, values = self.policy(ids, att, Q)
        lps, ents = [], []
        for row, lab in zip(logits, resp):            # one (R, V) slab at a time
            lse = torch.logsumexp(row, -1)
            lps.append(row.gather(-1, lab[:, None]).squeeze(-1) - lse)
            ents.append(lse - (torch.softmax(row, -1) * row).sum(-1))
        del logits
        out["logprobs"].append(torch.stack(lps)); out["entropy"].append(torch.stack(ents)); out["values"].append(values)
        ref_logits = self.policy.reference_logits(ids, att, Q)
        out["ref"].append(core.logprobs_from_logits(ref_logits, resp)); del ref_logits
    return tuple(torch.cat(out[k]).float() for k in ("logprobs", "values", "ref", "entropy"))

from torch.utils.checkpoint import checkpoint
import inspect, textwrap

def _row_logprobs(head, h, y):
    z = head(h)                                   # (R, V) for one episode only
    return z.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(z, -1)

def chunked_logprobs(policy, ids, att, Q, resp):
    """Values + log-probs with the LM head applied one episode at a time under checkpoint:
    only one (R, V) slab of logits is alive at once, in forward and in backward."""
    model = policy._causal_lm()
    hidden = policy._hidden(model, ids, att)[:, Q - 1:-1]
    values = policy.v_head(hidden.to(policy.v_head.weight.dtype)).squeeze(-1)
    head = model.get_output_embeddings()
    lp = torch.stack([checkpoint(_row_logprobs, head, h, y, use_reentrant=False) for h, y in zip(hidden, resp)])
    return lp, values

if "chunk" in variant:
    src = textwrap.dedent(inspect.getsource(PPOTrainer._optimize))
    old = """logits, values = self.policy(ro.input_ids[i], ro.attention_mask[i], Q)
                logprobs = core.logprobs_from_logits(logits, ro.response_ids[i]).float()"""
    assert old in src, "source changed"
    src = src.replace(old, "logprobs, values = chunked_logprobs(self.policy, ro.input_ids[i], ro.attention_mask[i], Q, ro.response_ids[i])\n                logprobs = logprobs.float()")
    ns = dict(vars(sys.modules["stackllama.ppo.trainer"])); ns["chunked_logprobs"] = chunked_logprobs
    exec(src, ns)
    PPOTrainer._optimize = ns["_optimize"]
import contextlib

@torch.no_grad()
def forward_no_grad_headrows(self, ro):
    """LM head applied one episode at a time: never a (b, R, V) tensor, policy or reference."""
    out = defaultdict(list)
    n = int(self.cfg.mini_batch_size); Q = ro.query_len; pol = self.policy
    for s in range(0, ro.input_ids.shape[0], n):
        ids, att, resp = ro.input_ids[s:s+n], ro.attention_mask[s:s+n], ro.response_ids[s:s+n]
        model = pol._causal_lm()
        hidden = pol._hidden(model, ids, att)[:, Q - 1:-1]
        out["values"].append(pol.v_head(hidden.to(pol.v_head.weight.dtype)).squeeze(-1))
        head = model.get_output_embeddings()
        lps, ents = [], []
        for h, lab in zip(hidden, resp):
            row = head(h); lse = torch.logsumexp(row, -1)
            lps.append(row.gather(-1, lab[:, None]).squeeze(-1) - lse)
            ents.append(lse - (torch.softmax(row, -1) * row).sum(-1))
        out["logprobs"].append(torch.stack(lps)); out["entropy"].append(torch.stack(ents))
        use_copy = pol.reference is not None
        with (contextlib.nullcontext() if use_copy else pol.lm.disable_adapter()):
            rmodel = pol._causal_lm(use_reference=use_copy)
            rh = pol._hidden(rmodel, ids, att)[:, Q - 1:-1]
            rhead = rmodel.get_output_embeddings()
            out["ref"].append(torch.stack([_row_logprobs(rhead, h, y) for h, y in zip(rh, resp)]))
    return tuple(torch.cat(out[k]).float() for k in ("logprobs", "values", "ref", "entropy"))

if "mallopt" in variant:  # what the CLI could do at startup: big blocks from mmap, returned on free
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
if "headrows" in variant:
    PPOTrainer._forward_no_grad = forward_no_grad_headrows
elif "rows" in variant:
    PPOTrainer._forward_no_grad = forward_no_grad_rows
if "fused" in variant:
    torch.optim.AdamW = functools.partial(torch.optim.AdamW, fused=True)
if "foreach" in variant:
    torch.optim.AdamW = functools.partial(torch.optim.AdamW, foreach=True)
import bench_ppo, common
spec = json.load(open(spec_path))
res = bench_ppo.worker_ours(spec, spec["finetune"], False)
res["variant"] = variant
common.write_json(__import__('pathlib').Path(out_path), res)
print(variant, spec["finetune"], "eps/s", res["episodes"]/res["train_s"], "peak", res["peak_rss_mb"], "pre", res["rss_preload_mb"], res["rss_peak_by_phase_first_step_mb"], res["time_split_s"])

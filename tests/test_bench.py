"""tools/bench.py: its quick run covers every section, and its two measuring helpers are right."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_quick_runs_every_section_and_writes_its_figures(tmp_path):
    """`python -m tools.bench --quick`: every section at toy sizes, and the GPU figure's code on the
    CPU; the JSON holds what the README's speed table is made from."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert {"machine", "gradcache", "embedding_path", "throughput", "scoring", "peer",
            "gpu_code_path"} <= set(r)
    assert {"vs_plain", "vs_without_cache_pass", "grad_max_abs_diff"} <= set(r["gradcache"]["lora"])
    assert r["gradcache"]["lora"]["grad_max_abs_diff"] < 1e-5  # GradCache's gradients are exact
    assert r["embedding_path"]["max_abs_diff"] < 1e-6  # both paths give the same vectors
    assert [(t["config"], t["stage"]) for t in r["throughput"]] == [
        ("toy", 1), ("toy", 2), ("real-width LLaVA", 1), ("real-width LLaVA", 2)]
    assert all(set(t["step_s"]) == {"0", "1", "2"} for t in r["throughput"])
    assert {"samples_per_s", "mfu", "peak_memory_gib"} <= set(r["gpu_code_path"])
    peer = r["peer"]  # sentence-transformers' CachedMultipleNegativesRankingLoss, same model
    assert {"eq4_s", "peer_s", "eq4_mb", "peer_mb", "eq4_over_peer"} <= set(peer)
    assert peer["loss_infonce"] == pytest.approx(peer["loss_peer"], abs=1e-5)  # the same loss
    assert peer["grad_max_abs_diff"] < 1e-5 < peer["grad_max_abs"]  # and the same gradients


def test_streamed_topk_equals_topk_over_all_scores():
    q, c = F.normalize(torch.randn(7, 16), dim=-1), F.normalize(torch.randn(50, 16), dim=-1)
    values, index = bench.topk(q, c, k=5, chunk=8)  # 50 = 6 chunks of 8 and one of 2
    full = (q @ c.T).topk(5, dim=1)
    assert torch.equal(index, full.indices) and torch.allclose(values, full.values)


def test_cpu_peak_memory_counts_live_tensors_only():

    def allocations():  # 4 MB, then 8 MB while the 4 MB live (peak 12), then 2 MB alone
        a = torch.empty(1 << 20)
        b = torch.empty(2 << 20)
        del a, b
        return torch.empty(512 << 10)
    kept, peak = bench.peak_memory(allocations)
    assert peak == 12 << 20 and kept.numel() == 512 << 10

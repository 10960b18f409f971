"""Shared test fixtures: tiny MLLMs built offline, and small random unit vectors."""
import atexit
import os
import shutil
import tempfile

# The tests' own cache folder (file hashes and the like), never the user's: set before any
# project module reads it, and removed when the session ends
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="unime-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tools.bench_step import gradcache_step  # noqa: E402,F401  (GradCache's three steps)
import toy.default  # noqa: E402
import toy.pretrain  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
# The tests' subprocesses (torchrun, kill-and-resume, bench) share 2 cores with this one: OpenMP
# threads that spin while they wait then slow a step down up to 60x; here they sleep. (Not for
# train.py itself: on a quiet machine spinning is 1.6x faster, measured on the toy's stage 2.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~5 s on 2 cores (training runs, subprocesses, "
                            "network retries); `-m 'not slow'` leaves them out")


def random_lora_b(model, std=0.1):
    """Every adapter's B drawn at random (LoRA starts it at zero), so the adapters change the
    outputs and A gets gradients."""
    import model as M
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, M.LoRALinear):
                m.lora_B.normal_(std=std)
    return model


def unit(n, d, seed=0, dtype=torch.float64):
    """(n, d) random L2-normalized rows, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """The toy's LLaVA architecture with random weights, saved like a downloaded checkpoint."""
    path = tmp_path_factory.mktemp("tiny") / "mllm"
    return toy.pretrain.build_tiny_mllm(str(path), toy.pretrain.corpus(), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_path):
    import model as M
    model, processor, family = M.load_mllm(tiny_path)
    return model.eval(), processor, family


@pytest.fixture(scope="session")
def pretrained_path():
    """The shipped pretrained toy (toy/mllm): zero-shot aligned, as a real MLLM is."""
    return toy.default.PRETRAINED

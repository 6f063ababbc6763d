"""An unreachable Hugging Face Hub: `bash run.sh` fails at the first request with one line that says
what to do (no retries of the Hub client), and a model already in the cache still loads."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from conftest import ROOT
from docmem import hub
from docmem.errors import FoundationUnavailableError
from fixtures_tiny import tiny_lm_dir  # noqa: F401
from foundations import load_pretrained


def closed_port() -> int:
    """A local port nobody listens on (bound, then released): a connection there is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """huggingface_hub pointed at a closed local port, and not in offline mode."""
    url = f"http://127.0.0.1:{closed_port()}"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", url)
    return url


@pytest.fixture
def answering_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local HTTP server standing in for the Hub (it answers 404 to everything)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # CI runs with these set
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", url)
    yield url
    server.shutdown()
    server.server_close()


def test_probe_says_why_the_hub_cannot_be_reached(unreachable_hub: str) -> None:
    reason = hub.unreachable_reason()
    assert reason is not None and "\n" not in reason and "Connect" in reason


def test_probe_accepts_any_answer(answering_hub: str) -> None:
    assert hub.unreachable_reason() is None  # a 501 is still the Hub answering


def test_run_sh_offline_fails_at_once_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST") and k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf"),
                "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    done = subprocess.run(["bash", str(ROOT / "run.sh"), "--save_dir", str(tmp_path / "runs")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(lines) == 1, done.stderr[-2000:]  # no "Retrying in Ns" of the Hub client
    line = lines[0]
    assert line.startswith("train_guidance.py: error: the Hugging Face Hub") and "cannot be reached" in line
    for advice in ("--data_path", "--lm_path", "--dataset synthetic", "bash run.sh demo"):
        assert advice in line
    assert not (tmp_path / "runs").exists()


def test_model_in_the_cache_loads_with_the_hub_unreachable(unreachable_hub: str, tiny_lm_dir: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    # the cache's layout for a Hub id: models--owner--name/{refs/main, snapshots/<commit>/files}
    repo = tmp_path / "cache" / "models--someone--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_lm_dir.iterdir():
        (snapshot / file.name).symlink_to(file)
    foundation = load_pretrained("someone/tiny", name="tiny", cache_dir=str(tmp_path / "cache"), num_gpus=0)
    assert foundation.num_blocks == 3


def test_model_not_in_the_cache_fails_with_one_line(unreachable_hub: str, tmp_path: Path) -> None:
    with pytest.raises(FoundationUnavailableError) as caught:
        load_pretrained("someone/absent", name="absent", cache_dir=str(tmp_path / "cache"), num_gpus=0)
    message = str(caught.value)
    assert "\n" not in message and "cannot be reached" in message and unreachable_hub in message
    assert "someone/absent" in message and "--lm_path" in message and "bash run.sh demo" in message

"""Whether the Hugging Face Hub answers: one quick request before a download from it.

Unreachable (no network, DNS failure, a closed port, a firewall), the Hub client would retry each
request with a growing pause (1 + 2 + 4 + 8 + 8 s) and print a warning per try before the error;
probing once lets a loader go straight to the local cache, or fail at once with one line.
"""
from __future__ import annotations

from huggingface_hub import constants
from huggingface_hub.utils import get_session, httpx  # httpx: the client's HTTP library (httpx2 here)

# A TCP + TLS handshake that takes longer than this is a broken network; once connected, the
# answer may take as long as the client allows a metadata request (HF_HUB_ETAG_TIMEOUT, 10 s).
CONNECT_TIMEOUT_S = 5.0
# What to do offline: for a data set (train_guidance.py, run.sh), and for a model (any command).
OFFLINE_ADVICE = ("offline, give local copies with --data_path DIR_OR_FILE and --lm_path DIR_OR_GGUF, or use "
                  "--dataset synthetic, or run the offline demo `bash run.sh demo` "
                  "(HF_HUB_OFFLINE=1 reads what is already in the cache)")
MODEL_OFFLINE_ADVICE = ("offline, give a local copy with --lm_path DIR_OR_GGUF, or run the offline demo "
                        "`bash run.sh demo` (HF_HUB_OFFLINE=1 reads what is already in the cache)")


def endpoint() -> str:
    """The Hub's address (HF_ENDPOINT, as huggingface_hub read it at import)."""
    return constants.ENDPOINT


def unreachable_reason() -> str | None:
    """None when the Hub endpoint answers (with any HTTP status); else why not, in one line.

    Uses huggingface_hub's own HTTP client, so its proxy settings and HF_ENDPOINT apply.
    """
    timeout = httpx.Timeout(float(constants.HF_HUB_ETAG_TIMEOUT), connect=CONNECT_TIMEOUT_S)
    try:
        get_session().head(endpoint(), timeout=timeout)
    except httpx.TransportError as err:  # DNS failure, refused, timed out, proxy error
        text = " ".join(str(err).split()) or "no answer"
        return f"{type(err).__name__}: {text}"[:200]
    return None

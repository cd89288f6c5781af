from __future__ import annotations

import pytest

from tools.bench import flame

# py-spy's raw format: root first, one distinct stack per line with its sample count.
FOLDED = "\n".join(
    [
        "<module> (runpy.py:1);run (asyncio/base_events.py:640);_store (services/gateway/stow.py:160);"
        "parse_instance (dicomsafe/dicom/validation.py:70);dcmread (pydicom/filereader.py:954) 30",
        "<module> (runpy.py:1);_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:83);"
        "_seal (dicomsafe/storage/sealer.py:90);update (cryptography/hazmat/primitives/ciphers/base.py:40) 20",
        "<module> (runpy.py:1);_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:83);"
        "_seal (dicomsafe/storage/sealer.py:88) 10",
        "<module> (runpy.py:1);_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:81);"
        "get (queue.py:171);wait (threading.py:355) 40",
        "garbage without a count",
    ]
)


@pytest.mark.unit
def test_samples_go_to_the_innermost_frame_a_rule_knows() -> None:
    shares = dict(flame.summarise(FOLDED))
    assert shares == {
        flame.IDLE: 0.4,
        "pydicom (parse, convert values)": 0.3,
        "AES-GCM and the sealed format": 0.2,
        # Our own frame under a thread's bootstrap (not the idle rule's wait): hashing in C, say.
        "dicomsafe/storage/sealer.py": 0.1,
    }

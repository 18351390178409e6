"""The valid-cell rule: an attack cell is a backdoor to score only if its baseline ASR is >= 85 % and
the same test images untriggered go to the target at most ASR/10 of the time."""

import pytest

from ci_jax import metrics


@pytest.mark.parametrize("asr, untriggered", [
    (1.0, 0.0),
    (0.9235, 0.0011),  # the seed attack on MNIST
    (850 / 1000, 0.0),  # ASR exactly at 85 %
    (0.9, 90 / 1000),  # untriggered exactly ASR/10
    (850 / 1000, 85 / 1000),  # both boundaries at once (10 x 0.085 is 0.8500000000000001 in floats)
])
def test_a_backdoor_is_valid(asr, untriggered):
    v = metrics.attack_cell_validity(asr, untriggered)
    assert v == (True, "") and v.valid and v.status == "valid"


@pytest.mark.parametrize("asr, untriggered, reason", [
    (849 / 1000, 0.0, "ASR 84.90 % < 85 %"),
    (0.9, 0.0901, "untriggered rate 9.01 % > ASR/10"),
    # bpp on MNIST in benchmark_v2: label noise, not a backdoor; both reasons.
    (0.377, 0.369, "ASR 37.70 % < 85 %; untriggered rate 36.90 % > ASR/10"),
    (0.465, 0.0, "ASR 46.50 % < 85 %"),  # SIG there
    (0.95, None, "untriggered target rate not measured"),  # a report from before it was measured
])
def test_an_invalid_cell_says_why(asr, untriggered, reason):
    v = metrics.attack_cell_validity(asr, untriggered)
    assert v == (False, reason) and v.status == "invalid"


@pytest.mark.parametrize("untriggered", [None, 0.0, 0.2])
def test_no_attack_is_its_own_status(untriggered):
    for asr in (None, float("nan")):  # no ASR: no attack (a summary's mean over no values is NaN or None)
        v = metrics.attack_cell_validity(asr, untriggered)
        assert not v.valid and v.status == "no attack" and v.reason == metrics.NO_ATTACK
        assert "FPR only" in v.reason

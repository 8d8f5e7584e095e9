"""The LoRA-trained tiny model of tests/eval (its answers end with EOS), shared with the synth tests."""

from tests.eval.conftest import trained  # noqa: F401

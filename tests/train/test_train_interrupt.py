"""The training loop's Ctrl-C handling: the first SIGINT is a stop request, the second
aborts, and the previous handler comes back afterwards."""

import os
import signal

import pytest

from mllm_jax.train.interrupt import StopOnInterrupt


def test_first_sigint_requests_a_stop_and_the_second_aborts(capsys):
    before = signal.getsignal(signal.SIGINT)
    with StopOnInterrupt() as interrupt:
        assert not interrupt.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested
        assert "stopping after the current step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before

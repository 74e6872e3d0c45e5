"""Test-session settings."""

import os
import signal

# Keep TensorFlow's C++ start-up chatter out of test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# A shell without job control starts background commands (`pytest &`,
# `nohup .ci/run &`) with Ctrl-C ignored, and an ignored signal stays ignored
# in every process they start, so the commands under test could not be
# interrupted. Python's own handler is what a terminal gives them; processes
# started from here get the default, which Python turns into the same.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

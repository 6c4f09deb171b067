"""Test-wide settings: 8 simulated CPU devices (set before JAX is imported),
so that sharded code paths can be compared with single-device ones."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax


def test_eight_cpu_devices():
    assert jax.default_backend() == "cpu"
    assert len(jax.devices()) == 8
    assert jax.local_device_count() == 8

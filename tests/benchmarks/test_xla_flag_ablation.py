"""benchmarks.xla_flag_ablation: each setting's XLA_FLAGS."""

from benchmarks import xla_flag_ablation
from spcl_jax.infra import xla_flags

FLAG = 'xla_cpu_experimental_ynn_fusion_type'


def test_settings_are_the_defaults_then_each_flag_turned_off():
  # this process's XLA_FLAGS after `import spcl_jax` added the defaults
  environ = f'--xla_force_host_platform_device_count=8 --{FLAG}=eltwise,reduce'
  settings = list(xla_flag_ablation.settings(environ))
  assert [(name, torch) for name, _, torch in settings] == [
      ('defaults', True), (f'--{FLAG}=', False)]
  defaults, off = settings[0][1], settings[1][1]
  assert defaults == environ
  # the flag appears once, empty: nothing left for XLA to read otherwise
  assert off == f'--xla_force_host_platform_device_count=8 --{FLAG}='
  assert xla_flags.named_flags(off) == {
      'xla_force_host_platform_device_count', FLAG}


def test_a_users_own_setting_is_replaced_only_in_the_off_run():
  settings = list(xla_flag_ablation.settings(f'--{FLAG}=dot'))
  assert settings[0][1] == f'--{FLAG}=dot'
  assert settings[1][1] == f'--{FLAG}='

"""The pipeline's stages as data: a name, a kind ('train' | 'prototypes' |
'pseudo_labels') and the stages whose outputs each reads (`STAGES`, in the
order `spcl_jax.run.pipeline.run` runs them)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  kind: str                           # 'train' | 'prototypes' | 'pseudo_labels'
  step: str | None = None             # train stages: 'warmup' | 'spcl' | ...
  model_from: str | None = None       # stage whose final model it starts from
  prototypes_from: str | None = None
  pseudo_labels_from: str | None = None


STAGES = (
    Stage('warmup', 'train', step='warmup'),
    Stage('prototypes', 'prototypes', model_from='warmup'),
    Stage('pseudo_labels', 'pseudo_labels', model_from='warmup'),
    Stage('spcl', 'train', step='spcl', model_from='warmup',
          prototypes_from='prototypes', pseudo_labels_from='pseudo_labels'),
    Stage('pseudo_labels_2', 'pseudo_labels', model_from='spcl'),
    Stage('self_training', 'train', step='self_training', model_from='spcl',
          pseudo_labels_from='pseudo_labels_2'),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
# The training stages, whose steps `config.stages.<name>` configures.
TRAINING_STAGES = tuple(stage.name for stage in STAGES if stage.kind == 'train')

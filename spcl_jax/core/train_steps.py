"""The pure per-stage training steps: warm-up, SPCL and self-training.

Every step is a pure function `(state, batches...) -> (state, metrics)`
compiled once with `jax.jit` (state donated). Parameters, optimiser states
and the prototype bank are replicated over the mesh, batches are sharded
along it; class sums, counts, BN statistics and confusion matrices are
therefore reductions over the global batch (XLA inserts the collectives).
Gradient accumulation is `core.micro_batches`'. Every pixel-averaged loss
is one mean over the global batch's valid pixels, or with
`stages.<stage>.images_per_loss_mean` = n > 0 the mean of the means over
runs of n images (`spcl.image_loss_weights`, the released code's per-GPU
losses).
"""

from typing import Callable

from clu import metrics as clu_metrics
import jax
import jax.numpy as jnp
import optax

from spcl_jax.core import micro_batches
from spcl_jax.core import spcl
from spcl_jax.core import train_state

Batch = dict


# ----------------------------------------------------------------- metrics --

def metrics_collection(names) -> type:
  """A CLU collection averaging each named scalar over the log interval."""
  return clu_metrics.Collection.create(
      **{name: clu_metrics.Average.from_output(name) for name in names})


WARMUP_METRICS = ('loss', 'seg_loss', 'adv_loss', 'disc_loss', 'grad_norm',
                  'lr')
SPCL_METRICS = ('loss', 'seg_loss', 'contrastive_source',
                'contrastive_target', 'source_mask_fraction',
                'target_mask_fraction', 'grad_norm', 'lr')
SELF_TRAINING_METRICS = ('loss', 'seg_loss', 'source_seg_loss', 'grad_norm',
                         'lr')


def split_batch_fields(name: str, stage) -> tuple:
  """The batch-size fields of the batches training stage `name`'s step
  splits into micro-batches."""
  if name == 'warmup':
    return ('source_batch_size',) + (
        ('target_batch_size',) if stage.adversarial_weight > 0 else ())
  if name == 'spcl':
    return ('source_batch_size', 'target_batch_size')
  if name == 'self_training':
    return ('target_batch_size',) + (
        ('source_batch_size',) if stage.source_batch_size else ())
  raise ValueError(f'{name!r} is not a training stage')


# ------------------------------------------------------------------- steps --

def _apply(model, state, params, images, bn_trainable, stream: int = 0):
  """Forward pass; with trainable BN, also the updated statistics (a model
  without BatchNorm, VGG-16, has none to update). A model with stochastic
  depth or dropout (SegFormer) draws them from the step's key folded with
  `stream` (0: source images, 1: target images); `state.rng` is already
  the micro-batch's own key in an accumulated step
  (`micro_batches.micro_batch_rng`)."""
  variables = {'params': params, 'batch_stats': state.batch_stats}
  rngs = {'dropout': jax.random.fold_in(state.rng, stream)}
  if bn_trainable and state.batch_stats:
    out, updates = model.apply(variables, images, train=True,
                               mutable=['batch_stats'], rngs=rngs)
    return out, updates['batch_stats']
  return (model.apply(variables, images, train=True, rngs=rngs),
          state.batch_stats)


def _forward_pair(model, state, params, source_images, target_images,
                  bn_trainable):
  """Source then target forward pass (BN statistics threaded through)."""
  src, stats = _apply(model, state, params, source_images, bn_trainable)
  tgt, stats = _apply(model, state.replace(batch_stats=stats), params,
                      target_images, bn_trainable, stream=1)
  return src, tgt, stats


def _micro_batch_state(state, index, k: int):
  """`state` with micro-batch `index`'s own random key (the forward passes
  of an accumulated step read their dropout keys from it)."""
  return state.replace(rng=micro_batches.micro_batch_rng(state.rng, index, k))


def _apply_updates(state, tx, grads, new_stats, **changes):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, batch_stats=new_stats,
                       rng=jax.random.split(state.rng)[0], **changes)


def images_per_loss_mean(stage) -> int:
  """`stage.images_per_loss_mean`: 0 (every loss the mean over the valid
  pixels of the global batch; also for a stage config without the field),
  or n (the mean of the means over runs of n images)."""
  return int(stage.get('images_per_loss_mean', 0))


def loss_weights(labels, num_classes: int, images_per_mean: int):
  """The image weights of a masked mean over `labels`' valid pixels
  (`spcl.image_loss_weights`), or None for the global batch's pixel mean
  (`images_per_mean` 0)."""
  if not images_per_mean:
    return None
  return spcl.image_loss_weights(labels, num_classes, images_per_mean)


def _share_or_one(labels, total, num_classes, weights):
  """A micro-batch's share of a global pixel mean; 1 when the loss is
  weighted per image (the weights already hold the global batch's)."""
  if weights is not None:
    return 1.0
  return micro_batches.share(labels, total, num_classes)


def _segmentation_term(logits, labels, total, weights, num_classes,
                       temperature):
  """A (micro-)batch's term of a global-batch cross-entropy: its share of
  the `total` valid pixels times its mean, or its images' sum with the
  global batch's image `weights`. `logits` are at the labels' size."""
  return _share_or_one(labels, total, num_classes, weights) * (
      spcl.segmentation_loss(logits, labels, temperature,
                             image_weights=weights))


def _lr(stage, step):
  return train_state.learning_rate(stage)(step)


def make_warmup_step(model, discriminator, tx, d_tx, stage, disc_cfg
                     ) -> Callable:
  """Stage 1: source CE (logits / T, upsampled) + λ_adv output-space
  adversarial loss; the discriminator sees softmax(source logits / T) and
  softmax(target logits). With adversarial weight 0 (source-only) the target
  forward pass and the discriminator are skipped. With `micro_batches` k > 1
  both networks' gradients are accumulated over the micro-batches (the
  discriminator's from the parameters the step started with, as at k = 1)."""
  adversarial = stage.adversarial_weight > 0
  collection = metrics_collection(WARMUP_METRICS)
  num_classes = model.num_classes
  k = micro_batches.micro_batch_count(stage)
  per_mean = images_per_loss_mean(stage)

  def step(state: train_state.TrainState, source: Batch, target: Batch | None = None):
    trainable_stats = stage.bn_trainable and bool(state.batch_stats)
    batches = {'source': source,
               'seg_weights': loss_weights(source['label'], num_classes,
                                           per_mean)}
    if adversarial:
      batches['target'] = target
    num_seg = micro_batches.num_valid(source['label'], num_classes)

    def micro_step(batch, index):  # this (micro-)batch's share of every sum
      source, target = batch['source'], batch.get('target')
      state_j = _micro_batch_state(state, index, k)
      size = source['label'].shape[1:3]

      def loss_fn(params):
        if adversarial:
          src, tgt, stats = _forward_pair(model, state_j, params,
                                          source['image'], target['image'],
                                          stage.bn_trainable)
        else:
          src, stats = _apply(model, state_j, params, source['image'],
                              stage.bn_trainable)
          tgt = None
        src_logits = spcl.upsample_bilinear(src['logits'], size)
        seg = _segmentation_term(src_logits, source['label'], num_seg,
                                 batch['seg_weights'], num_classes,
                                 stage.logit_temperature)
        if not adversarial:
          return seg, (seg, jnp.zeros(()), stats, None, None)
        src_prob = jax.nn.softmax(src_logits / stage.logit_temperature, -1)
        tgt_prob = jax.nn.softmax(spcl.upsample_bilinear(
            tgt['logits'], target['label'].shape[1:3]), -1)
        adv = spcl.generator_adversarial_loss(
            discriminator.apply(state.disc_params, tgt_prob),
            disc_cfg.source_label) / k
        return (seg + stage.adversarial_weight * adv,
                (seg, adv, stats, src_prob, tgt_prob))

      (loss, (seg, adv, stats, src_prob, tgt_prob)), grads = (
          jax.value_and_grad(loss_fn, has_aux=True)(state.params))
      out = {'loss': loss, 'seg': seg, 'adv': adv, 'grads': grads}
      if trainable_stats:
        out['stats'] = micro_batches.stats_share(stats, k)
      if adversarial:
        def disc_loss_fn(disc_params):
          return spcl.discriminator_loss(
              discriminator.apply(disc_params,
                                  jax.lax.stop_gradient(src_prob)),
              discriminator.apply(disc_params,
                                  jax.lax.stop_gradient(tgt_prob)),
              disc_cfg.source_label, disc_cfg.target_label) / k
        out['disc_loss'], out['d_grads'] = jax.value_and_grad(disc_loss_fn)(
            state.disc_params)
      return out

    total = micro_batches.accumulate(micro_step, batches, k)
    grads = total['grads']
    disc_loss = jnp.zeros(())
    changes = {}
    if adversarial:
      disc_loss = total['disc_loss']
      d_updates, d_opt_state = d_tx.update(total['d_grads'],
                                           state.disc_opt_state,
                                           state.disc_params)
      changes = {'disc_params': optax.apply_updates(state.disc_params,
                                                    d_updates),
                 'disc_opt_state': d_opt_state}
    new_state = _apply_updates(state, tx, grads,
                               total.get('stats', state.batch_stats),
                               **changes)
    metrics = collection.single_from_model_output(
        loss=total['loss'], seg_loss=total['seg'], adv_loss=total['adv'],
        disc_loss=disc_loss, grad_norm=optax.tree.norm(grads),
        lr=_lr(stage, state.step))
    return new_state, metrics

  return step


def make_spcl_step(model, tx, stage, class_thresholds=None) -> Callable:
  """Stage 4: L_seg + λ (L_cl^s + w_t L_cl^t) and the Eq. 3 prototype update
  from the global batch's source class sums, applied after the loss
  (`prototype_update = 'after_loss'`) or before it ('before_loss', as the
  released code does); w_t = `target_contrastive_weight` (0: L_cl^s only).
  The target batch's `label` is the offline pseudo-label map ('offline') or
  unused ('online', Eq. 5 with `class_thresholds`).

  With `micro_batches` k > 1 the class sums and the masks' pixel counts are
  needed before any micro-batch's loss (the 'before_loss' bank and every
  contrastive mean depend on the whole batch), so a forward-only pass over
  the micro-batches computes the masks M_s (and online M_t) and the class
  sums first; the micro-batches' gradients are then accumulated with those
  masks: about one more source forward pass per step."""
  collection = metrics_collection(SPCL_METRICS)
  num_classes = model.num_classes
  k = micro_batches.micro_batch_count(stage)
  per_mean = images_per_loss_mean(stage)
  if stage.target_mask == 'online' and class_thresholds is None:
    raise ValueError("spcl.target_mask = 'online' needs class thresholds")

  def prototypes_for_loss(state, updated_bank):
    """'before_loss' (the released code): the loss sees the prototypes
    already moved towards this step's class means."""
    return (updated_bank if stage.prototype_update == 'before_loss'
            else state.prototype_bank).prototypes

  def terms_weights(source_label, source_mask, target_mask):
    """The image weights of L_seg, L_cl^s, L_cl^t (global batch), or
    (None, None, None) for the global batch's pixel means."""
    if not per_mean:
      return (None, None, None)
    return tuple(loss_weights(labels, num_classes, per_mean)
                 for labels in (source_label, source_mask, target_mask))

  def loss_terms(src, tgt, source, source_mask, target_mask, prototypes,
                 shares=(1.0, 1.0, 1.0), weights=(None, None, None)):
    """L_seg, L_cl^s, L_cl^t and the loss of a (micro-)batch, each mean
    weighted by its share of the global batch's mean (1 when k = 1), or
    each a sum with the global batch's image `weights`."""
    src_logits = spcl.upsample_bilinear(src['logits'],
                                        source['label'].shape[1:3])
    seg = shares[0] * spcl.segmentation_loss(
        src_logits, source['label'], stage.logit_temperature,
        image_weights=weights[0])
    cl_s = shares[1] * spcl.contrastive_loss(
        src['features'], prototypes, source_mask, stage.temperature,
        image_weights=weights[1])
    cl_t = shares[2] * spcl.contrastive_loss(
        tgt['features'], prototypes, target_mask, stage.temperature,
        image_weights=weights[2])
    loss = seg + stage.contrastive_weight * (
        cl_s + stage.target_contrastive_weight * cl_t)
    return {'loss': loss, 'seg': seg, 'cl_s': cl_s, 'cl_t': cl_t}

  def mask_fraction(mask):
    return jnp.mean(mask != spcl.IGNORE_INDEX)

  def step_metrics(state, terms, grads):
    return collection.single_from_model_output(
        loss=terms['loss'], seg_loss=terms['seg'],
        contrastive_source=terms['cl_s'], contrastive_target=terms['cl_t'],
        source_mask_fraction=terms['source_fraction'],
        target_mask_fraction=terms['target_fraction'],
        grad_norm=optax.tree.norm(grads), lr=_lr(stage, state.step))

  def step(state: train_state.TrainState, source: Batch, target: Batch):
    def updated_bank(features, source_mask):
      sums, counts = spcl.class_feature_sums(
          jax.lax.stop_gradient(features), source_mask, num_classes)
      return spcl.update_prototypes(state.prototype_bank, sums, counts,
                                    stage.alpha, stage.decay_absent_classes)

    def loss_fn(params):
      src, tgt, stats = _forward_pair(model, state, params, source['image'],
                                      target['image'], stage.bn_trainable)
      source_mask = spcl.source_mask(source['label'], src['logits'])
      target_mask = spcl.target_mask(
          stage.target_mask, tgt['logits'], offline_labels=target['label'],
          class_thresholds=class_thresholds)
      bank = updated_bank(src['features'], source_mask)
      terms = loss_terms(src, tgt, source, source_mask, target_mask,
                         prototypes_for_loss(state, bank),
                         weights=terms_weights(source['label'], source_mask,
                                               target_mask))
      terms['source_fraction'] = mask_fraction(source_mask)
      terms['target_fraction'] = mask_fraction(target_mask)
      return terms['loss'], (terms, stats, bank)

    (_, (terms, stats, bank)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    return (_apply_updates(state, tx, grads, stats, prototype_bank=bank),
            step_metrics(state, terms, grads))

  def accumulated_step(state: train_state.TrainState, source: Batch, target: Batch):
    trainable_stats = stage.bn_trainable and bool(state.batch_stats)
    sources = micro_batches.split_micro_batches(source, k)
    targets = micro_batches.split_micro_batches(target, k)

    def masks_and_sums(sums, indexed):  # forward only, at the step's params
      index, (source, target) = indexed
      state_j = _micro_batch_state(state, index, k)
      src, _ = _apply(model, state_j, state.params, source['image'],
                      stage.bn_trainable)
      source_mask = spcl.source_mask(source['label'], src['logits'])
      if stage.target_mask == 'online':
        logits = _apply(model, state_j, state.params, target['image'],
                        stage.bn_trainable, stream=1)[0]['logits']
      else:  # only the logits' shape is read
        shape = jax.eval_shape(
            lambda images: model.apply(state.variables(), images),
            target['image'])['logits']
        logits = jnp.zeros(shape.shape, shape.dtype)
      target_mask = spcl.target_mask(
          stage.target_mask, logits, offline_labels=target['label'],
          class_thresholds=class_thresholds)
      batch_sums = spcl.class_feature_sums(src['features'], source_mask,
                                           num_classes)
      return (jax.tree.map(jnp.add, sums, batch_sums),
              (source_mask, target_mask))

    bank_shape = state.prototype_bank.prototypes.shape
    zeros = (jnp.zeros(bank_shape, jnp.float32),
             jnp.zeros(bank_shape[:1], jnp.float32))
    (sums, counts), (source_masks, target_masks) = jax.lax.scan(
        masks_and_sums, zeros, (jnp.arange(k, dtype=jnp.int32),
                                (sources, targets)))
    bank = spcl.update_prototypes(state.prototype_bank, sums, counts,
                                  stage.alpha, stage.decay_absent_classes)
    prototypes = prototypes_for_loss(state, bank)
    num_seg = micro_batches.num_valid(source['label'], num_classes)
    num_source = micro_batches.num_valid(source_masks, num_classes)
    num_target = micro_batches.num_valid(target_masks, num_classes)
    weights = terms_weights(
        source['label'], micro_batches.merge_micro_batches(source_masks),
        micro_batches.merge_micro_batches(target_masks))
    weights = micro_batches.split_micro_batches(weights, k)

    def micro_step(batch, index):
      source, target, source_mask, target_mask, weights = batch
      state_j = _micro_batch_state(state, index, k)
      shares = (1.0, 1.0, 1.0) if per_mean else (
          micro_batches.share(source['label'], num_seg, num_classes),
          micro_batches.share(source_mask, num_source, num_classes),
          micro_batches.share(target_mask, num_target, num_classes))

      def loss_fn(params):
        src, tgt, stats = _forward_pair(model, state_j, params,
                                        source['image'], target['image'],
                                        stage.bn_trainable)
        terms = loss_terms(src, tgt, source, source_mask, target_mask,
                           prototypes, shares=shares, weights=weights)
        return terms['loss'], (terms, stats)

      (_, (terms, stats)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      out = {**terms, 'grads': grads,
             'source_fraction': mask_fraction(source_mask) / k,
             'target_fraction': mask_fraction(target_mask) / k}
      if trainable_stats:
        out['stats'] = micro_batches.stats_share(stats, k)
      return out

    total = micro_batches.sum_over_micro_batches(
        micro_step, (sources, targets, source_masks, target_masks, weights))
    grads = total['grads']
    new_state = _apply_updates(state, tx, grads,
                               total.get('stats', state.batch_stats),
                               prototype_bank=bank)
    return new_state, step_metrics(state, total, grads)

  return step if k == 1 else accumulated_step


def make_self_training_step(model, tx, stage) -> Callable:
  """Stage 6: cross-entropy on target pseudo labels (Eq. 9); with a source
  batch (`stage.source_batch_size` > 0) also `stage.source_weight` times the
  source cross-entropy (joint self-training, as in CBST). `micro_batches`
  k > 1 accumulates the gradients of k micro-batches (module docstring)."""
  collection = metrics_collection(SELF_TRAINING_METRICS)
  num_classes = model.num_classes
  k = micro_batches.micro_batch_count(stage)
  per_mean = images_per_loss_mean(stage)

  def step(state: train_state.TrainState, target: Batch, source: Batch | None = None):
    trainable_stats = stage.bn_trainable and bool(state.batch_stats)
    batches = {'target': target,
               'target_weights': loss_weights(target['label'], num_classes,
                                              per_mean)}
    num_target = micro_batches.num_valid(target['label'], num_classes)
    if source is not None:
      batches['source'] = source
      batches['source_weights'] = loss_weights(source['label'], num_classes,
                                               per_mean)
      num_source = micro_batches.num_valid(source['label'], num_classes)

    def term(out, labelled, total, weights):
      return _segmentation_term(
          spcl.upsample_bilinear(out['logits'], labelled['label'].shape[1:3]),
          labelled['label'], total, weights, num_classes,
          stage.logit_temperature)

    def micro_step(batch, index):
      target, source = batch['target'], batch.get('source')
      state_j = _micro_batch_state(state, index, k)

      def loss_fn(params):
        if source is None:
          tgt, stats = _apply(model, state_j, params, target['image'],
                              stage.bn_trainable, stream=1)
          source_loss = jnp.zeros((), jnp.float32)
        else:
          src, tgt, stats = _forward_pair(model, state_j, params,
                                          source['image'], target['image'],
                                          stage.bn_trainable)
          source_loss = term(src, source, num_source,
                             batch.get('source_weights'))
        target_loss = term(tgt, target, num_target, batch['target_weights'])
        loss = target_loss + stage.source_weight * source_loss
        return loss, (stats, target_loss, source_loss)

      (loss, (stats, target_loss, source_loss)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      out = {'loss': loss, 'target_loss': target_loss,
             'source_loss': source_loss, 'grads': grads}
      if trainable_stats:
        out['stats'] = micro_batches.stats_share(stats, k)
      return out

    total = micro_batches.accumulate(micro_step, batches, k)
    grads = total['grads']
    new_state = _apply_updates(state, tx, grads,
                               total.get('stats', state.batch_stats))
    metrics = collection.single_from_model_output(
        loss=total['loss'], seg_loss=total['target_loss'],
        source_seg_loss=total['source_loss'],
        grad_norm=optax.tree.norm(grads), lr=_lr(stage, state.step))
    return new_state, metrics

  return step


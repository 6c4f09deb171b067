r"""The feature-space analysis of finished training stages behind
`python -m spcl_jax.analyze` (its docstring: usage, defaults, outputs):
the Class Center Distance per class (the paper's Figure 5, appendix Eq. 10)
and a t-SNE of pixel features (its Figure 4), for several models of one
workdir side by side.

Features are the segmenter's feature map before the classifier
(`"features"`, at 1/8 of the input), L2-normalised as the prototypes are;
the ground-truth labels are nearest-downsampled to that grid as the
prototype stage does (`spcl.nearest_resize`), every labelled pixel counts
(not only those the model gets right). Per domain and model, one pass over
the images accumulates per-class sums of the features, of their squared
distances to the class mean (batch by batch, merged without cancellation)
and the pixel counts (memory independent of the number of images),
from which μ_c (the class's mean feature), the mean squared distance of
the class's features to μ_c and

  CCD(c) = mean over the other classes k present of
           (mean_{x in c} ||x - μ_c||²) / ||μ_c - μ_k||²

(`metrics.class_center_distance`, over the classes present in that
domain's sample; smaller: a more compact, better separated class). The same
pass keeps a uniform random sample of at most `pixels_per_class` features
per class (the lowest of a random priority per pixel), from which
`tsne_points` points (source and target together) are embedded with
scikit-learn's TSNE, one embedding per model.
"""

import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import metrics
from spcl_jax.core import spcl
from spcl_jax.data import global_batches
from spcl_jax.data import loaders
from spcl_jax.data import sources as sources_lib
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.report import feature_figures
from spcl_jax.run import context
from spcl_jax.run import trained_model

DEFAULT_STAGES = ('warmup', 'spcl')
DOMAINS = feature_figures.DOMAINS
MIN_TSNE_ITERATIONS = 250   # scikit-learn's minimum (early exaggeration)


# ------------------------------------------------------ batch statistics --

def batch_statistics(features: jax.Array, labels: jax.Array,
                     priorities: jax.Array, num_classes: int,
                     pixels_per_class: int) -> dict:
  """What one batch adds to a domain's statistics. Jit-able.

  features [B, h, w, N] (unnormalised), labels [B, H, W] class ids (255 or
  any value outside [0, C): ignored) at any resolution, nearest-downsampled
  to (h, w) as the prototype stage does; priorities [B, h, w] uniform
  random numbers. Returns per class the sums of the L2-normalised features
  [C, N], the sums of their squared distances to the class's mean in this
  batch [C] and the pixel counts [C]; and the at most `pixels_per_class`
  pixels of each class of lowest priority: their priorities [C, P] (inf: no
  pixel) and normalised features [C, P, N]."""
  if labels.ndim != 3 or labels.shape[0] != features.shape[0]:
    raise ValueError(f'labels {labels.shape} do not match features '
                     f'{features.shape}')
  mask = spcl.nearest_resize(labels, features.shape[1:3]).astype(jnp.int32)
  mask = jnp.where(spcl.valid_mask(mask, num_classes), mask,
                   spcl.IGNORE_INDEX)
  sums, counts = spcl.class_feature_sums(features, mask, num_classes)
  batch_means = sums / jnp.maximum(counts, 1)[:, None]
  squared_distances, _ = metrics.class_distance_sums(features, mask,
                                                     batch_means)
  f = spcl.l2_normalize(features.astype(jnp.float32))
  f = f.reshape(-1, features.shape[-1])
  y = mask.reshape(-1)
  k = min(pixels_per_class, y.shape[0])
  scores = jnp.where(y[None, :] == jnp.arange(num_classes)[:, None],
                     -priorities.reshape(1, -1).astype(jnp.float32), -jnp.inf)
  top, index = jax.lax.top_k(scores, k)                # [C, k]
  return {'sums': sums, 'squared_distances': squared_distances,
          'counts': counts,
          'priorities': -top, 'samples': f[index]}


class DomainStatistics:
  """A domain's statistics accumulated over batches on the host: per class
  the float64 sums of the features, the sums of their squared distances to
  the class mean (`squared_distances`, merged as in Chan et al.'s parallel
  variance: no cancellation) and the pixel counts; a sample pool of at most
  `pixels_per_class` pixels per class."""

  def __init__(self, num_classes: int, pixels_per_class: int):
    self.num_classes, self.pixels_per_class = num_classes, pixels_per_class
    self.sums = self.squared_distances = self.counts = None
    self.priorities = np.full((num_classes, 0), np.inf)
    self.samples = None

  def add(self, stats: dict) -> None:
    stats = jax.device_get(stats)
    sums, squared, counts = (np.asarray(stats[k], np.float64) for k in (
        'sums', 'squared_distances', 'counts'))
    if self.counts is None:
      self.sums, self.squared_distances, self.counts = sums, squared, counts
    else:
      delta = (sums / np.maximum(counts, 1)[:, None]
               - self.sums / np.maximum(self.counts, 1)[:, None])
      total = self.counts + counts
      self.squared_distances = (
          self.squared_distances + squared + np.sum(delta * delta, axis=-1)
          * self.counts * counts / np.maximum(total, 1))
      self.sums, self.counts = self.sums + sums, total
    samples = np.asarray(stats['samples'], np.float32)
    if self.samples is None:
      self.samples = np.zeros((self.num_classes, 0, samples.shape[-1]),
                              np.float32)
    priorities = np.concatenate([self.priorities,
                                 np.asarray(stats['priorities'], np.float64)],
                                axis=1)
    samples = np.concatenate([self.samples, samples], axis=1)
    order = np.argsort(priorities, axis=1, kind='stable')[
        :, :self.pixels_per_class]
    self.priorities = np.take_along_axis(priorities, order, axis=1)
    self.samples = np.take_along_axis(samples, order[..., None], axis=1)

  def centers(self) -> np.ndarray:
    """μ [C, N]: the mean normalised feature of each class (0 if none)."""
    return self.sums / np.maximum(self.counts, 1)[:, None]

  def class_center_distance(self) -> np.ndarray:
    """CCD [C] over the classes present (NaN for the others)."""
    present = [c for c in range(self.num_classes) if self.counts[c] > 0]
    return metrics.class_center_distance(
        self.squared_distances, self.counts, self.centers(), present)

  def sample(self):
    """(features [M, N], classes [M], priorities [M]) of the sample pool."""
    kept = np.isfinite(self.priorities)
    classes = np.broadcast_to(np.arange(self.num_classes)[:, None],
                              kept.shape)
    return self.samples[kept], classes[kept], self.priorities[kept]


# ------------------------------------------------------------ the passes --

class _Subset:
  """Records `indices` of a data source, in that order."""

  def __init__(self, source, indices):
    self._source, self._indices = source, [int(i) for i in indices]

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[self._indices[i]]


def sample_indices(num_records: int, num_images: int, seed: int,
                   domain: str) -> np.ndarray:
  """The sorted record indices of `num_images` images of a domain (all if
  the split has no more), the same for every model."""
  rng = np.random.default_rng([seed, DOMAINS.index(domain)])
  n = min(num_images, num_records)
  return np.sort(rng.choice(num_records, n, replace=False))


def make_feature_step(model, pixels_per_class: int):
  """(variables, batch, key) -> `batch_statistics` of the batch's features
  (padding images ignored); jit it."""
  def step(variables, batch, key):
    features = model.apply(variables, batch['image'],
                           train=False)['features']
    labels = jnp.where(batch['valid'][:, None, None],
                       batch['label'].astype(jnp.int32), spcl.IGNORE_INDEX)
    priorities = jax.random.uniform(key, features.shape[:3])
    return batch_statistics(features, labels, priorities, model.num_classes,
                            pixels_per_class)
  return step


def domain_statistics(ctx, step, variables, spec, source, seed: int,
                      domain: str, num_classes: int,
                      pixels_per_class: int) -> DomainStatistics:
  """One pass over a domain's sampled images with one model."""
  stats = DomainStatistics(num_classes, pixels_per_class)
  key = jax.random.fold_in(jax.random.key(seed), DOMAINS.index(domain))
  keys = ('image', 'label', 'valid')
  for i, batch in enumerate(loaders.eval_batches(spec, source)):
    batch = global_batches.to_global({k: batch[k] for k in keys}, ctx.mesh, keys)
    stats.add(step(variables, batch, jax.random.fold_in(key, i)))
  return stats


# ---------------------------------------------------------------- t-SNE --

def tsne_selection(priorities_by_domain: dict, tsne_points: int,
                   seed: int) -> dict:
  """domain -> indices into its sample pool of the points to embed:
  `tsne_points` drawn at random from the pools of both domains together."""
  sizes = [len(priorities_by_domain[d]) for d in DOMAINS]
  rng = np.random.default_rng([seed, 2])
  chosen = np.sort(rng.choice(sum(sizes), min(tsne_points, sum(sizes)),
                              replace=False))
  return {'source': chosen[chosen < sizes[0]],
          'target': chosen[chosen >= sizes[0]] - sizes[0]}


def embed(features: np.ndarray, seed: int,
          iterations: int = 500) -> np.ndarray:
  """[M, 2] t-SNE embedding (scikit-learn, perplexity 30 or less for few
  points, PCA initialisation, `iterations` of which 250 of early
  exaggeration)."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  n = len(features)
  if n < 4:   # TSNE needs perplexity < n
    return np.zeros((n, 2))
  perplexity = float(min(30.0, (n - 1) / 3))
  return TSNE(n_components=2, perplexity=perplexity, init='pca',
              max_iter=iterations, random_state=seed).fit_transform(
                  np.asarray(features, np.float64))


# -------------------------------------------------------------- figures --


def choose_stages(workdir: str, stages) -> list[str]:
  """The asked stages, each checked to have a model; by default those of
  `DEFAULT_STAGES` that are finished (an error listing the stages that
  exist if none is)."""
  if stages:
    return [trained_model.choose_stage(workdir, s) for s in stages]
  finished = trained_model.finished_training_stages(workdir)
  chosen = [s for s in DEFAULT_STAGES if s in finished]
  if not chosen:
    raise trained_model.StageNotAvailableError(
        f'none of the default stages {list(DEFAULT_STAGES)} is finished; '
        f'finished stages in {workdir}: '
        f'{trained_model.finished_stages(workdir) or "none"}; those with a '
        f'model (training stages): {finished or "none"}')
  return chosen


def _check_sizes(num_images, pixels_per_class, tsne_points,
                 tsne_iterations) -> None:
  for name, value, low in (('num_images', num_images, 1),
                           ('pixels_per_class', pixels_per_class, 1),
                           ('tsne_points', tsne_points, 0),
                           ('tsne_iterations', tsne_iterations,
                            MIN_TSNE_ITERATIONS)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f'--{name} = {value!r} must be an integer >= {low}')


def analyze(workdir: str, output: str | None = None, stages=None,
            checkpoint: str = 'final', num_images: int = 100,
            pixels_per_class: int = 100, tsne_points: int = 1000,
            seed: int = 0, source_split: str | None = None,
            target_split: str | None = None,
            tsne_iterations: int = 500) -> tuple[dict, str]:
  """CCD and t-SNE of `stages`' models; returns (the content of ccd.json,
  the output directory). Every check comes before any compute."""
  workdir = storage.resolve(workdir)
  config = trained_model.read_config(workdir)
  stages = choose_stages(workdir, stages)
  _check_sizes(num_images, pixels_per_class, tsne_points, tsne_iterations)
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.eval_batch_size = trained_model.batch_size(config)
  ctx = trained_model.context(config, workdir, checkpoint)
  model_dirs = {s: trained_model.model_directory(ctx, s) for s in stages}
  data = config.data
  domains = {
      'source': (data.source, source_split or data.source_split,
                 data.source_size),
      'target': (data.target, target_split or data.val_split,
                 data.target_size)}
  sources = {d: sources_lib.open_source(name, split, ctx.data_dir())
             for d, (name, split, _) in domains.items()}
  output = trained_model.check_output_dir(
      output or os.path.join(workdir, 'analysis'))

  num_classes = config.model.num_classes
  names = label_table.class_names(data.label_space)
  indices = {d: sample_indices(len(sources[d]), num_images, seed, d)
             for d in DOMAINS}
  specs = {d: context.eval_spec(
      ctx, name, split, size, data.eval_batch_size, resize_label=True)
           for d, (name, split, size) in domains.items()}
  steps = {}   # one compiled step per model (BatchNorm's ε differs)
  result, pools = {}, {}
  for stage in stages:
    logging.info('analysing %s', model_dirs[stage])
    model, variables = trained_model.load(ctx, stage)
    if model not in steps:
      steps[model] = jax.jit(make_feature_step(model, pixels_per_class),
                             out_shardings=mesh_lib.replicated(ctx.mesh))
    step = steps[model]
    entry, pools[stage] = {}, {}
    for d in DOMAINS:
      stats = domain_statistics(
          ctx, step, variables, specs[d], _Subset(sources[d], indices[d]),
          seed, d, num_classes, pixels_per_class)
      ccd = stats.class_center_distance()
      entry[d] = {
          'per_class': {n: (None if np.isnan(v) else float(v))
                        for n, v in zip(names, ccd)},
          'mean': (float(np.nanmean(ccd)) if np.any(~np.isnan(ccd))
                   else None),
          'pixels': {n: int(c) for n, c in zip(names, stats.counts)}}
      pools[stage][d] = stats.sample()
    result[stage] = {'stage': stage, 'model_directory': model_dirs[stage],
                     **entry}
  report = {
      'models': result, 'classes': list(names), 'checkpoint': checkpoint,
      'seed': seed, 'pixels_per_class': pixels_per_class,
      'tsne_points': tsne_points, 'tsne_iterations': tsne_iterations,
      **{d: {'dataset': domains[d][0], 'split': domains[d][1],
             'size': list(domains[d][2]), 'num_images': len(indices[d]),
             'image_indices': [int(i) for i in indices[d]]}
         for d in DOMAINS}}
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(output, 'ccd.json'), report)
    feature_figures.plot_ccd(os.path.join(output, 'ccd.png'), result, names)
    if tsne_points:
      embeddings = {}
      for stage in stages:
        # the pools hold the same pixels for every model (same images and
        # priorities), so every panel embeds the same points
        chosen = tsne_selection({d: pools[stage][d][2] for d in DOMAINS},
                                tsne_points, seed)
        features = np.concatenate([pools[stage][d][0][chosen[d]]
                                   for d in DOMAINS])
        points = embed(features, seed, tsne_iterations)
        n_source = len(chosen['source'])
        embeddings[stage] = {
            'source': (points[:n_source],
                       pools[stage]['source'][1][chosen['source']]),
            'target': (points[n_source:],
                       pools[stage]['target'][1][chosen['target']])}
      feature_figures.plot_tsne(os.path.join(output, 'tsne.png'), embeddings,
                                data.label_space)
  return report, output

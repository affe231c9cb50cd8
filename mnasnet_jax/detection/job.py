"""The 'detect' job: SSDLite trained and evaluated on `config.data` with train.py's pieces
(RMSProp-TF and its schedule, EMA, the data-parallel step over a mesh, Orbax checkpoints that a
restarted job resumes from, TensorBoard scalars), COCO mAP after every `eval_every_steps` (on BN
statistics re-estimated first when `bn_recalibration_batches` is set), then a picture of predicted
boxes (DIR/detections.png) and the TFLite detector (DIR/detector.tflite) checked against the JAX
outputs and timed. A finished workdir run again is evaluated again. Multi-host jobs evaluate
process 0's share of the evaluation split."""

from __future__ import annotations

import functools
import json
import os

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax import platform
from mnasnet_jax import pretrained
from mnasnet_jax import train
from mnasnet_jax.detection import boxes as boxes_lib
from mnasnet_jax.detection import data as data_lib
from mnasnet_jax.detection import export as export_lib
from mnasnet_jax.detection import loss as loss_lib
from mnasnet_jax.detection import metric
from mnasnet_jax.detection import nms
from mnasnet_jax.detection import ssdlite

AXIS = platform.BATCH_AXIS


def create_detector(config, definition: pretrained.ModelDef, num_classes: int, **forms):
  """SSDLite on `definition`'s backbone; `forms` override the config's device forms and BN."""
  settings = dict(
    depthwise=config.depthwise,
    conv=config.conv,
    dtype=config.dtype,
    bn_axis_name=AXIS,
    bn_momentum=config.bn_momentum,
    bn_group_size=config.bn_group_size,
  )
  backbone = definition.create(feature_maps=True, **{**settings, **forms})
  return ssdlite.SSDLite(
    backbone,
    num_classes,
    tuple(config.ssd.extra_depths),
    ssdlite.boxes_per_location(config),
    config.ssd.class_prior_bias,
    config.ssd.min_depth,
  )


def train_step(state, images, boxes, labels, *, model, tx, schedule, config, anchors, image_stats):
  """One data-parallel step: targets matched on the device, SSD's loss, L2, RMSProp, EMA."""
  ssd = config.ssd
  target_codes, target_classes = jax.vmap(
    functools.partial(
      boxes_lib.targets,
      anchors=jnp.asarray(anchors),
      threshold=ssd.match_threshold,
      scales=tuple(ssd.box_scales),
    )
  )(boxes, labels, labels > 0)

  def loss_fn(params):
    (codes, logits), updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      train.normalise(images, image_stats),
      train=True,
      mutable=['batch_stats'],
    )
    parts = loss_lib.ssd_loss(
      codes, logits, target_codes, target_classes, ssd.negatives_per_positive, ssd.min_negatives
    )
    detection = (
      ssd.localization_weight * parts['localization']
      + ssd.classification_weight * parts['classification']
    )
    total = detection + config.weight_decay * train.weight_penalty(params, state.batch_stats)
    return total, (updates['batch_stats'], parts)

  (total, (batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = lax.pmean(
    {
      'loss': total,
      'localization': parts['localization'],
      'classification': parts['classification'],
      'matches': parts['matches'].astype(jnp.float32),
    },
    AXIS,
  )
  metrics['learning_rate'] = schedule(state.step)
  grads = lax.pmean(grads, AXIS)
  return train.apply_gradients(state, grads, batch_stats, tx=tx, config=config), metrics


def predictions(mesh, model, anchors, scales, image_stats):
  """jit(shard_map) of (variables, uint8 images) -> [B, N, 4 + C] boxes and scores, split as the
  images are."""

  def predict(variables, images):
    return export_lib.outputs(
      model, variables, train.normalise(images, image_stats), anchors, scales
    )

  return jax.jit(
    jax.shard_map(predict, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS), check_vma=False)
  )


def evaluation_variables(state, use_ema: bool):
  if use_ema:
    return {'params': state.ema_params, 'batch_stats': state.ema_batch_stats}
  return {'params': state.params, 'batch_stats': state.batch_stats}


def evaluate(predict, variables, data, config, mesh, batch_size: int):
  """(COCO metrics, the first images' (image, truth, detections) for the picture)."""
  truths, found, shown = [], [], []
  for images, mask, batch_truths in data.eval_batches(batch_size, config.eval_examples):
    (out,) = train.shard_batch(mesh, images)
    out = np.asarray(jax.device_get(predict(variables, out)))[: int(mask.sum())]
    for image, truth, row in zip(images, batch_truths, out):
      detections = nms.detect(
        row[:, :4],
        row[:, 4:],
        config.nms.score_threshold,
        config.nms.iou_threshold,
        config.nms.max_per_class,
        config.nms.max_total,
      )
      truths.append(truth)
      found.append(detections)
      if len(shown) < config.picture_images:
        shown.append((image, truth, detections))
  return metric.coco_metrics(truths, found, data.num_classes), shown


def draw(shown, class_names, min_score: float, iou_threshold: float, path: str):
  """The images with their predicted boxes (score >= min_score, labelled; of boxes overlapping
  above `iou_threshold`, whatever their classes, the best only, for a legible picture) and, dashed,
  the truth."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 2.8), squeeze=False)
  for ax, (image, truth, found) in zip(axes[0], shown):
    size = image.shape[0]
    ax.imshow(image)
    ax.set_axis_off()
    for y0, x0, y1, x1 in truth['boxes'] * size:
      ax.add_patch(
        plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls='--', ec='white', lw=0.8)
      )
    confident = found['scores'] >= min_score
    boxes, scores, classes = (found[k][confident] for k in ('boxes', 'scores', 'classes'))
    for i in nms.non_max_suppression(boxes, scores, iou_threshold, len(scores)):
      y0, x0, y1, x1 = boxes[i] * size
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec='orange', lw=1.2))
      label = class_names[classes[i] - 1]
      ax.text(x0, y0, f'{label} {scores[i]:.2f}', color='orange', fontsize=6, va='bottom')
  fig.suptitle('SSDLite: predicted boxes (orange), ground truth (dashed)', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def backbone_start(config, workdir: str, num_classes: int, resumed: bool, model_kwargs):
  """(backbone ModelDef, initial variables or None): a resumed run's own model.json; else
  `config.init_from`'s model and its weights but the classifier; else the config's model."""
  path = os.path.join(workdir, train.MODEL_FILE)
  if resumed and os.path.isfile(path):
    with open(path) as f:
      return pretrained.ModelDef.from_json(f.read()), None
  definition = train.model_def(config, config.arch, num_classes)
  if resumed or not config.init_from:
    return definition, None
  checkpoint = train.load_checkpoint(config.init_from, config.source_model)
  definition = checkpoint.model or definition
  loaded = {
    collection: {k: v for k, v in tree.items() if k != 'classifier'}
    for collection, tree in checkpoint.variables.items()
  }
  backbone = definition.create(feature_maps=True, **model_kwargs)
  taken = train.initial_variables(
    backbone, config.resolution, loaded, config.init_from, new_classifier=False
  )
  logging.info('backbone from %s: %d variables', config.init_from, len(taken))
  return definition, {(path[0], 'backbone') + path[1:]: v for path, v in taken.items()}


def run(config, workdir):
  """launch/main.py's 'detect' job."""
  from clu import metric_writers
  from clu import periodic_actions
  import orbax.checkpoint as ocp

  from mnasnet_jax import checkpoints

  if not workdir:
    raise errors.UserError('the detect job needs --workdir=DIR for its checkpoints and metrics')
  workdir = os.path.abspath(workdir)
  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = platform.data_mesh()
  local_batch = train.check_batch(config.batch_size, mesh, process_count)
  eval_batch = train.eval_batch_part(config.eval_batch_size, mesh, process_count)
  models.architecture(config.arch)  # a malformed block string fails before the data loads
  data = data_lib.create(config.data, config.resolution, process_index, process_count)
  steps_per_epoch = data.num_train / config.batch_size
  total_steps = train.num_steps(config, steps_per_epoch)
  manager = checkpoints.manager(
    workdir,
    max_to_keep=config.checkpoints_to_keep,
    save_interval_steps=config.checkpoint_every_steps,
  )
  definition, initial = backbone_start(
    config,
    workdir,
    data.num_classes,
    manager.latest_step() is not None,
    {'depthwise': 'native', 'dtype': 'float32'},
  )
  if process_index == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, train.MODEL_FILE), 'w') as f:
      f.write(definition.to_json())
  model = create_detector(config, definition, data.num_classes)
  ssdlite.stride32_layer(model.backbone.layer_specs(config.resolution))  # a UserError, early
  anchors = ssdlite.anchors(config, config.resolution)
  tx, schedule = train.create_optimizer(config, steps_per_epoch)
  use_ema = bool(config.ema_decay)
  state = train.create_state(model, tx, config.resolution, use_ema, config.seed, mesh, initial)
  image_stats = (data.mean, data.std)
  scales = tuple(config.ssd.box_scales)
  step_fn = train.data_parallel(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      config=config,
      anchors=anchors,
      image_stats=image_stats,
    ),
    mesh,
    3,
    donate_state=True,
  )
  predict = predictions(mesh, model, anchors, scales, image_stats)
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
  start_step = int(state.step)
  writer = metric_writers.create_default_writer(workdir, just_logging=process_index > 0)
  logging.info(
    'SSDLite on %s: %d params, %d anchors, %d steps of %d images, from step %d',
    config.arch,
    models.count_params(state.params),
    len(anchors),
    total_steps,
    config.batch_size,
    start_step,
  )
  progress = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
  )
  batches = data.train_batches(local_batch, config.seed, start_step)
  stats_fn = train.batch_stats_program(
    create_detector(config, definition, data.num_classes, bn_momentum=0.0), mesh, image_stats
  )

  def recalibrated(state):
    """`state` with its evaluated BN statistics re-estimated on training batches, when the
    config asks: a run of a few hundred steps ends with weights moving faster than running
    averages follow (seen on the canvases: AP 0.0003 with them, 0.10 recalibrated)."""
    if not config.bn_recalibration_batches:
      return state
    return train.recalibrate_batch_stats(
      stats_fn, state, batches, config.bn_recalibration_batches, mesh, use_ema
    )

  history, result, shown = [], None, []
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = step_fn(state, *train.shard_batch(mesh, *next(batches)))
      history.append(metrics)
      progress(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        summary = {
          f'train_{k}': float(np.mean(v))
          for k, v in jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *history)).items()
        }
        if not np.isfinite(summary['train_loss']):
          raise train.TrainingDiverged(f'training loss became {summary["train_loss"]} at {step}')
        writer.write_scalars(step, summary)
        history = []
      if step % config.eval_every_steps == 0 or step == total_steps:
        state = recalibrated(state)
        result, shown = evaluate(
          predict, evaluation_variables(state, use_ema), data, config, mesh, eval_batch
        )
        writer.write_scalars(step, {f'eval_{k}': v for k, v in result.items()})
        logging.info('step %d: %s', step, result)
      manager.save(step, args=ocp.args.StandardSave(state), force=step == total_steps)
  finally:
    manager.wait_until_finished()
    writer.flush()
  if result is None:  # resumed at the end: evaluate what it has (recalibrated before it was saved)
    result, shown = evaluate(
      predict, evaluation_variables(state, use_ema), data, config, mesh, eval_batch
    )
  if process_index:
    return
  report = {'step': int(state.step), **result}
  if shown:
    draw(
      shown,
      data.class_names,
      config.picture_min_score,
      config.nms.iou_threshold,
      os.path.join(workdir, 'detections.png'),
    )
  if config.export:
    report['tflite'] = export_detector(config, definition, data, state, use_ema, shown, workdir)
  with open(os.path.join(workdir, 'eval.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print(
    f'SSDLite {config.arch} at step {report["step"]}: '
    + ', '.join(
      f'{k} {100 * result[k]:.1f}' if result[k] >= 0 else f'{k} n/a (no such objects)'
      for k in metric.NAMES
    )
    + f' (COCO mAP x100 on {config.data.dataset}); {os.path.join(workdir, "eval.json")}'
  )


def export_detector(config, definition, data, state, use_ema: bool, shown, workdir: str) -> dict:
  """DIR/detector.tflite, its largest difference from the JAX outputs on the picture's images,
  and its latency (latency/profiler.py's litert backend, back to back after warm-up)."""
  from mnasnet_jax.latency import profiler

  anchors = ssdlite.anchors(config, config.resolution)
  scales = tuple(config.ssd.box_scales)
  model = create_detector(
    config, definition, data.num_classes, depthwise='native', conv='native', bn_axis_name=None
  )
  variables = jax.device_get(evaluation_variables(state, use_ema))
  content = export_lib.detector_tflite(model, variables, config.resolution, anchors, scales)
  path = os.path.join(workdir, 'detector.tflite')
  with open(path, 'wb') as f:
    f.write(content)
  images = np.stack([image for image, _, _ in shown])
  images = np.asarray(train.normalise(images, (data.mean, data.std)))
  want = np.asarray(
    jax.jit(functools.partial(export_lib.outputs, model, anchors=anchors, scales=scales))(
      variables, images
    )
  )
  got = export_lib.run_tflite(content, images)
  lat = config.latency
  timing = profiler.LiteRTBackend(lat.warmup, lat.repeats, lat.num_threads, lat.instances).time(
    content, 'detector'
  )
  report = {
    'file': path,
    'size_mb': os.path.getsize(path) / 1e6,
    'max_abs_difference': float(np.max(np.abs(got - want))),
    # Relative to the output's size, at least 1 (an image side: an untrained detector's boxes
    # reach far outside it, where float32 rounding is larger).
    'max_relative_difference': float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1))),
    'images_compared': len(images),
    'latency_ms': timing,
  }
  print(
    f'wrote {path} ({report["size_mb"]:.2f} MB): outputs within '
    f'{report["max_abs_difference"]:.2e} of JAX on {len(images)} images, '
    f'{timing["median_ms"]:.2f} ms median (litert, {lat.num_threads} thread)'
  )
  return report

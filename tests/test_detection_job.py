"""The detection data, the detect job end to end (training, COCO mAP, picture, TFLite export
against JAX, resuming), its start from a classification checkpoint, and its one-line errors."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax import pretrained
from mnasnet_jax import train
from mnasnet_jax.configs import detection as detection_config
from mnasnet_jax.detection import data
from mnasnet_jax.detection import job

TINY = [
  'r1_k3_s22_e1_i32_o16',
  'r1_k3_s22_e3_i16_o24',
  'r1_k3_s22_e3_i24_o32',
  'r1_k3_s22_e3_i32_o40',
]


def tiny_config(**changes):
  config = detection_config.get_config('local,resolution=64')
  config.arch = ','.join(TINY)
  config.ssd.extra_depths = (64, 32, 32, 16)
  config.data.canvas_size = 64
  config.data.item_scale = (16, 32)
  config.data.num_train = 64
  config.data.num_eval = 16
  config.data.shuffle_buffer = 64
  config.batch_size = 8
  config.num_steps = 3
  config.bn_recalibration_batches = 2
  config.eval_batch_size = 8
  config.log_every_steps = 3
  config.picture_images = 2
  config.latency.instances = 1
  config.latency.warmup = 1
  config.latency.repeats = 2
  config.depthwise = 'native'
  config.conv = 'native'
  for key, value in changes.items():
    config[key] = value
  return config


@pytest.mark.slow  # tf.data's start: 10-70 s on a loaded 2-core VM
def test_canvases_and_augmentation():
  config = tiny_config()
  canvases = data.create(config.data, 64)
  images, boxes, labels = next(canvases.train_batches(8, seed=0))
  assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
  assert boxes.shape == (8, config.data.max_boxes, 4) and labels.shape == (8, config.data.max_boxes)
  real = labels > 0
  assert real.any() and labels.max() <= 10
  assert np.all(boxes[real] >= 0) and np.all(boxes[real] <= 1)
  assert np.all(boxes[real][:, 2:] > boxes[real][:, :2])
  assert np.all(boxes[~real] == 0)
  # A canvas's boxes are its items' tight boxes: the pixels on their edges are lit, outside dark.
  image, canvas_boxes, canvas_labels = canvases._canvas(False, 0)
  assert len(canvas_boxes) == len(canvas_labels) >= 1
  lit = np.zeros_like(image, bool)
  for y0, x0, y1, x1 in np.round(canvas_boxes * 64).astype(int):
    lit[y0:y1, x0:x1] = True
  assert image[~lit].max() == 0
  (images, mask, truths), *_ = canvases.eval_batches(8, 16)
  assert mask.sum() == 8 and truths[0]['height'] == 64


def test_random_crop_keeps_the_whole_image_when_told():
  import tensorflow as tf

  config = tiny_config().data.augmentation
  config.keep_original_probability = 1.0
  image = tf.constant(np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3))
  boxes = tf.constant([[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.9, 0.8]], tf.float32)
  out, moved, labels = data.ssd_random_crop(image, boxes, tf.constant([1, 2]), [1, 2], config)
  np.testing.assert_array_equal(out, image)
  np.testing.assert_allclose(moved, boxes, atol=1e-6)
  np.testing.assert_array_equal(labels, [1, 2])
  config.keep_original_probability = 0.0
  for seed in range(8):
    out, moved, labels = data.ssd_random_crop(image, boxes, tf.constant([1, 2]), [seed, 0], config)
    assert out.shape[0] <= 30 and out.shape[1] <= 40 and len(moved) == len(labels) <= 2
    assert np.all(moved.numpy() >= -1e-6) and np.all(moved.numpy() <= 1 + 1e-6)


def test_missing_coco_is_one_line(tmp_path):
  config = detection_config.get_config()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(errors.UserError, match=r'coco/2017 is not prepared .* `tfds build coco/2017'):
    data.create(config.data, 320)


def test_backbone_from_a_classification_checkpoint(monkeypatch, tmp_path):
  definition = pretrained.ModelDef(models.architecture(TINY), num_classes=10)
  classifier = definition.create(depthwise='native', dtype='float32')
  variables = jax.jit(classifier.init)(jax.random.PRNGKey(3), jnp.zeros((1, 64, 64, 3)))
  monkeypatch.setattr(
    train, 'load_checkpoint', lambda path, source: train.Checkpoint(variables, definition)
  )
  config = tiny_config(init_from='classifier')
  found, initial = job.backbone_start(
    config, str(tmp_path), 10, False, {'depthwise': 'native', 'dtype': 'float32'}
  )
  assert found == definition
  flat = flax.traverse_util.flatten_dict(variables)
  assert not any('classifier' in path for path in initial)
  assert len(initial) == len(flat) - 2  # all but the classifier's kernel and bias
  np.testing.assert_array_equal(
    initial['params', 'backbone', 'layer_3', 'expand', 'kernel'],
    flat['params', 'layer_3', 'expand', 'kernel'],
  )
  detector = job.create_detector(config, found, 10, depthwise='native', bn_axis_name=None)
  shapes = flax.traverse_util.flatten_dict(models.variable_shapes(detector, (1, 64, 64, 3)))
  assert all(shapes[path].shape == value.shape for path, value in initial.items())


@pytest.mark.slow
def test_detect_job_trains_evaluates_exports_and_resumes(tmp_path, capsys):
  config = tiny_config()
  job.run(config, str(tmp_path))
  report = json.loads((tmp_path / 'eval.json').read_text())
  assert report['step'] == 3 and 0 <= report['AP'] <= 1 and 'AP_small' in report
  assert report['tflite']['max_relative_difference'] < 1e-4
  assert report['tflite']['latency_ms']['median_ms'] > 0
  assert os.path.getsize(tmp_path / 'detector.tflite') > 0
  assert os.path.getsize(tmp_path / 'detections.png') > 0
  # Run again: it resumes at its last step and evaluates the same weights to the same mAP.
  config.export = False
  job.run(config, str(tmp_path))
  again = json.loads((tmp_path / 'eval.json').read_text())
  assert again['step'] == 3 and again['AP'] == report['AP']
  assert 'AP50' in capsys.readouterr().out

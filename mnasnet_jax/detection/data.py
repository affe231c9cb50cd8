"""Detection data: COCO 2017 through TFDS (`coco/2017`), or objects of Fashion-MNIST placed on
larger canvases (offline, for a run on this CPU), both through one tf.data pipeline with SSD's
augmentation.

Augmentation (the TF OD API's `ssd_random_crop` and `random_horizontal_flip`, as SSDLite's config
lists them): one of 7 crops drawn at random, each demanding that the window cover at least 0, 0.1,
0.3, 0.5, 0.7, 0.9 or 1.0 of some object (area 10-100% of the image, aspect ratio 1/2-2, 100
attempts) and keeping the objects of which that share lies inside it, clipped to it; with
probability 0.15 the whole image instead; then a horizontal flip half the time. Images are resized
to the model's square input (TF OD API's fixed_shape_resizer) and cross to the device as uint8;
objects as padded (boxes [M, 4] normalised (ymin, xmin, ymax, xmax), labels [M], 0 the padding).
"""

from __future__ import annotations

import math
import os

import numpy as np

from mnasnet_jax import errors
from mnasnet_jax import input_pipeline

FASHION_MNIST_CLASSES = (
  'T-shirt',
  'trouser',
  'pullover',
  'dress',
  'coat',
  'sandal',
  'shirt',
  'sneaker',
  'bag',
  'boot',
)
MIN_COVERED = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def ssd_random_crop(image, boxes, labels, seed, config):
  """(image, boxes, labels) cropped as SSD's augmentation does (module docstring); tf ops."""
  import tensorflow as tf

  seeds = tf.random.experimental.stateless_split(seed, 3)
  choice = tf.random.stateless_uniform([], seeds[0], 0, len(MIN_COVERED), tf.int32)
  covered = tf.gather(tf.constant(MIN_COVERED), choice)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.shape(image),
    tf.reshape(boxes, [1, -1, 4]),
    seed=seeds[1],
    min_object_covered=covered,
    aspect_ratio_range=tuple(config.crop_aspect_ratio),
    area_range=tuple(config.crop_area),
    max_attempts=config.crop_attempts,
    use_image_if_no_bounding_boxes=True,
  )
  whole = tf.random.stateless_uniform([], seeds[2]) < config.keep_original_probability
  shape = tf.shape(image)
  begin = tf.where(whole, tf.zeros_like(begin), begin)
  size = tf.where(whole, shape, size)
  hw = tf.cast(shape[:2], tf.float32)
  y0, x0 = tf.cast(begin[0], tf.float32) / hw[0], tf.cast(begin[1], tf.float32) / hw[1]
  h, w = tf.cast(size[0], tf.float32) / hw[0], tf.cast(size[1], tf.float32) / hw[1]
  window = tf.stack([y0, x0, y0 + h, x0 + w])
  inside = tf.concat(
    [tf.maximum(boxes[:, :2], window[:2]), tf.minimum(boxes[:, 2:], window[2:])], 1
  )
  extent = lambda b: tf.maximum(b[:, 2] - b[:, 0], 0.0) * tf.maximum(b[:, 3] - b[:, 1], 0.0)
  share = extent(inside) / tf.maximum(extent(boxes), 1e-12)
  keep = (share >= covered) & (extent(inside) > 0)
  moved = (tf.boolean_mask(inside, keep) - tf.stack([y0, x0, y0, x0])) / tf.stack([h, w, h, w])
  image = tf.slice(image, begin, size)
  return image, moved, tf.boolean_mask(labels, keep)


def flip(image, boxes, seed):
  import tensorflow as tf

  flipped = tf.random.stateless_uniform([], seed) < 0.5
  image = tf.cond(flipped, lambda: tf.image.flip_left_right(image), lambda: image)
  mirrored = tf.stack([boxes[:, 0], 1 - boxes[:, 3], boxes[:, 2], 1 - boxes[:, 1]], 1)
  return image, tf.where(flipped, mirrored, boxes)


def finish(image, boxes, labels, image_size: int, max_boxes: int):
  """Resized uint8 image, boxes and labels padded (or cut) to `max_boxes`."""
  import tensorflow as tf

  image = tf.image.resize(image, [image_size, image_size], 'bilinear')
  image = tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)
  boxes, labels = boxes[:max_boxes], labels[:max_boxes]
  pad = max_boxes - tf.shape(labels)[0]
  return (
    tf.reshape(image, [image_size, image_size, 3]),
    tf.pad(tf.cast(boxes, tf.float32), [[0, pad], [0, 0]]),
    tf.pad(tf.cast(labels, tf.int32), [[0, pad]]),
  )


def augment(image, boxes, labels, seed, config, image_size: int, max_boxes: int):
  import tensorflow as tf

  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image, boxes, labels = ssd_random_crop(image, boxes, labels, crop_seed, config)
  image, boxes = flip(image, boxes, flip_seed)
  return finish(image, boxes, labels, image_size, max_boxes)


class DetectionData:
  """Training batches (images uint8 [B, S, S, 3], boxes [B, M, 4], labels [B, M]) and evaluation
  batches (images, mask [B], the real images' ground truth for metric.coco_metrics)."""

  name: str
  num_classes: int
  image_size: int
  num_train: int
  class_names: tuple[str, ...]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  def __init__(self, config, image_size: int, process_index: int = 0, process_count: int = 1):
    self.config, self.image_size = config, image_size
    self.process_index, self.process_count = process_index, process_count

  def _examples(self, train: bool, seed: int | None = None):
    """tf.data of (image uint8 [H, W, 3], boxes, labels, truth dict) of this process's shard."""
    raise NotImplementedError

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    run_seed = int(np.random.default_rng((seed, start_step, self.process_index)).integers(2**31))
    ds = self._examples(train=True, seed=run_seed).repeat()
    ds = ds.shuffle(self.config.shuffle_buffer, seed=run_seed).enumerate()
    ds = ds.map(
      lambda i, ex: augment(
        ex[0],
        ex[1],
        ex[2],
        tf.stack([tf.cast(run_seed, tf.int64), i]),
        self.config.augmentation,
        self.image_size,
        self.config.max_boxes,
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))

  def eval_batches(self, batch_size: int, limit: int | None = None):
    """(images, mask, truths) batches of the evaluation part, the last one padded; `truths` holds
    the real images' {'height', 'width', 'boxes', 'classes', 'areas', 'crowd'}."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds = self._examples(train=False)
    if limit is not None:
      ds = ds.take(math.ceil(limit / self.process_count))
    ds = ds.map(
      lambda image, boxes, labels, truth: (
        finish(image, boxes, labels, self.image_size, 1)[0],
        truth,
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    for images, truth in tfds.as_numpy(ds.padded_batch(batch_size)):
      n = len(images)
      truths = [
        {
          'height': int(truth['height'][i]),
          'width': int(truth['width'][i]),
          'boxes': truth['boxes'][i][: truth['count'][i]],
          'classes': truth['classes'][i][: truth['count'][i]],
          'areas': truth['areas'][i][: truth['count'][i]],
          'crowd': truth['crowd'][i][: truth['count'][i]],
        }
        for i in range(n)
      ]
      pad = batch_size - n
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
      yield images, np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]), truths


def _truth(image, boxes, labels, areas, crowd):
  import tensorflow as tf

  shape = tf.shape(image)
  return {
    'height': shape[0],
    'width': shape[1],
    'boxes': tf.cast(boxes, tf.float32),
    'classes': tf.cast(labels, tf.int32),
    'areas': tf.cast(areas, tf.float32),
    'crowd': tf.cast(crowd, tf.bool),
    'count': tf.shape(labels)[0],
  }


class Coco(DetectionData):
  """TFDS coco/2017: 'train' (118,287 images, trainval35k's successor) and 'validation' (5,000).
  Its 80 categories are labels 1..80; crowd regions are left out of training and kept, as
  pycocotools wants them, in evaluation."""

  name = 'coco/2017'
  num_classes = 80
  class_names = None  # the builder's
  mean, std = input_pipeline.IMAGENET_MEAN, input_pipeline.IMAGENET_STD
  num_train = 118_287

  def __init__(self, config, image_size, process_index=0, process_count=1):
    super().__init__(config, image_size, process_index, process_count)
    import tensorflow_datasets as tfds

    data_dir = config.data_dir or os.path.expanduser('~/tensorflow_datasets')
    self.builder = tfds.builder('coco/2017', data_dir=data_dir)
    if not self.builder.is_prepared():
      if not config.download:
        raise input_pipeline.DatasetMissingError(
          f'TFDS coco/2017 is not prepared in {data_dir}: build it once with `tfds build '
          f'coco/2017 --data_dir={data_dir}` (it downloads about 25 GB from cocodataset.org), or '
          'pass --config.data.download=True to let this job do it, or --config.data.data_dir=DIR '
          'where it is prepared.'
        )
      self.builder.download_and_prepare()
    self.class_names = self.builder.info.features['objects']['label'].names

  def _examples(self, train, seed=None):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    split = tfds.even_splits('train' if train else 'validation', n=self.process_count)[
      self.process_index
    ]
    ds = self.builder.as_dataset(
      split=split,
      shuffle_files=train,
      read_config=tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16),
    )

    def convert(ex):
      objects = ex['objects']
      labels = tf.cast(objects['label'], tf.int32) + 1
      boxes, crowd = objects['bbox'], objects['is_crowd']
      truth = _truth(ex['image'], boxes, labels, objects['area'], crowd)
      if train:
        boxes, labels = tf.boolean_mask(boxes, ~crowd), tf.boolean_mask(labels, ~crowd)
      return ex['image'], boxes, labels, truth

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def canvas(items, item_labels, rng, size: int, objects: tuple[int, int], scale: tuple[int, int]):
  """One grey canvas [size, size] with a few items pasted at random scales and places (a later
  item overwrites an earlier one where they overlap), and their tight boxes (normalised) and
  labels 1..10."""
  from PIL import Image

  image = np.zeros((size, size), np.uint8)
  boxes, labels = [], []
  for _ in range(rng.integers(objects[0], objects[1] + 1)):
    i = rng.integers(len(items))
    side = int(rng.integers(scale[0], scale[1] + 1))
    item = np.asarray(Image.fromarray(items[i]).resize((side, side), Image.BILINEAR))
    y, x = rng.integers(0, size - side + 1, 2)
    region = image[y : y + side, x : x + side]
    np.maximum(region, item, out=region)
    rows, cols = np.flatnonzero(item.max(1) > 0), np.flatnonzero(item.max(0) > 0)
    if rows.size == 0:
      continue
    boxes.append([y + rows[0], x + cols[0], y + rows[-1] + 1, x + cols[-1] + 1])
    labels.append(int(item_labels[i]) + 1)
  return image, np.asarray(boxes, np.float32).reshape(-1, 4) / size, np.asarray(labels, np.int32)


class Canvases(DetectionData):
  """Fashion-MNIST items (its training images for training, its test images for evaluation)
  on `config.canvas_size` canvases, `config.objects` of them each, `config.item_scale` pixels a
  side, with their tight boxes: a real detection task that needs no download beyond
  Fashion-MNIST's (input_pipeline.load_fashion_mnist)."""

  name = 'fashion_mnist_canvases'
  num_classes = 10
  class_names = FASHION_MNIST_CLASSES

  def __init__(self, config, image_size, process_index=0, process_count=1):
    super().__init__(config, image_size, process_index, process_count)
    (self.train_x, self.train_y), (self.test_x, self.test_y) = input_pipeline.load_fashion_mnist(
      config.data_dir, config.download
    )
    self.num_train = config.num_train
    # Normalisation from a sample of training canvases (the model sees (x - mean) / std).
    sample = np.stack([self._canvas(True, i)[0] for i in range(64)])
    self.mean, self.std = (float(sample.mean()),) * 3, (float(sample.std()),) * 3

  def _canvas(self, train: bool, index: int):
    c = self.config
    items, labels = (self.train_x, self.train_y) if train else (self.test_x, self.test_y)
    rng = np.random.default_rng((c.split_seed, int(train), index))
    return canvas(items, labels, rng, c.canvas_size, tuple(c.objects), tuple(c.item_scale))

  def _examples(self, train, seed=None):
    import tensorflow as tf

    count = self.config.num_train if train else self.config.num_eval
    indices = range(self.process_index, count, self.process_count)

    def generate():
      for index in indices:
        image, boxes, labels = self._canvas(train, index)
        yield np.repeat(image[..., None], 3, axis=2), boxes, labels

    ds = tf.data.Dataset.from_generator(
      generate,
      output_signature=(
        tf.TensorSpec([None, None, 3], tf.uint8),
        tf.TensorSpec([None, 4], tf.float32),
        tf.TensorSpec([None], tf.int32),
      ),
    )
    return ds.map(
      lambda image, boxes, labels: (
        image,
        boxes,
        labels,
        _truth(image, boxes, labels, _pixel_areas(image, boxes), tf.zeros_like(labels, tf.bool)),
      )
    )


def _pixel_areas(image, boxes):
  import tensorflow as tf

  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  return (boxes[:, 2] - boxes[:, 0]) * hw[0] * (boxes[:, 3] - boxes[:, 1]) * hw[1]


def create(config, image_size: int, process_index: int = 0, process_count: int = 1):
  if config.dataset == 'coco/2017':
    return Coco(config, image_size, process_index, process_count)
  if config.dataset == 'fashion_mnist_canvases':
    return Canvases(config, image_size, process_index, process_count)
  raise errors.UserError(
    f'unknown detection dataset {config.dataset!r}: expected coco/2017 or fashion_mnist_canvases'
  )

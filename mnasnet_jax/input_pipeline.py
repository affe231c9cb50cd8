"""Images and labels for training and for the search's proxy training.

Two splits of every dataset:

* 'search' (paper section 4): the training set, with `config.holdout` images held out as the
  validation set whose accuracy is the reward's ACC(m); the rest is the proxy-training part.
* 'full': the whole training set, and the official validation (test) set for evaluation.

Datasets: ImageNet (TFDS `imagenet2012` built from the manually downloaded archives; tf.data with
the Inception crop for training and the center crop for evaluation), Fashion-MNIST (its IDX files, by
default where Debian's `dataset-fashion-mnist` puts them, or TFDS's download when
`config.download` is set), scikit-learn's 8x8 digits, and synthetic
class-dependent images for tests. Each process reads its own shard; batches are this process's part
of the global batch, which `train.py` lays out over the devices. Images stay uint8 up to the device,
a quarter of float32's bytes to move, and are normalised there with the data's `mean` and `std`.
"""

from __future__ import annotations

import abc
import gzip
import math
import os
from typing import Iterator

import numpy as np

from mnasnet_jax import errors

# ImageNet's per-channel statistics, on the 0-255 scale (official preprocessing).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
IMAGENET_SIZES = {'train': 1_281_167, 'validation': 50_000}
CROP_PADDING = 32
SPLITS = ('search', 'full')
DATASETS = ('imagenet2012', 'fashion_mnist', 'digits', 'synthetic')
NUM_CLASSES = {'imagenet2012': 1000, 'fashion_mnist': 10, 'digits': 10}
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


class DatasetMissingError(errors.UserError):
  """The dataset is not on this machine; the message says how to get it."""


class Data(abc.ABC):
  """A training part and an evaluation part, as this process sees them."""

  name: str
  num_classes: int
  image_size: int
  num_train: int  # examples in the training part, all processes together
  num_eval: int  # examples in the evaluation part, all processes together
  process_count: int
  # Per channel, on the 0-255 scale: the model sees (x - mean) / std.
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @abc.abstractmethod
  def train_batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator:
    """Endless (images uint8 NHWC, labels int32) batches of this process's `batch_size`."""

  @abc.abstractmethod
  def eval_batches(self, batch_size: int, limit: int | None = None) -> Iterator:
    """One pass over the evaluation part (or its first `limit` examples, all processes together)
    as (images, labels, mask) batches padded to `batch_size`; every process yields as many batches."""

  def eval_steps(self, batch_size: int, limit: int | None = None) -> int:
    total = self.num_eval if limit is None else min(limit, self.num_eval)
    return math.ceil(math.ceil(total / self.process_count) / batch_size)


def create(config, split: str, process_index: int = 0, process_count: int = 1) -> Data:
  """The dataset `config.dataset` cut by `split` ('search' or 'full'), this process's shard."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}')
  if config.dataset == 'imagenet2012':
    return ImageNet(config, split, process_index, process_count)
  if config.dataset == 'fashion_mnist':
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(config.data_dir, config.download)
  elif config.dataset == 'digits':
    train_x, train_y, test_x, test_y = load_digits(config.test_size, config.split_seed)
  elif config.dataset == 'synthetic':
    train_x, train_y, test_x, test_y = synthetic(
      config.num_train, config.num_eval, config.image_size, config.num_classes, config.split_seed
    )
  else:
    raise errors.UserError(f'unknown dataset {config.dataset!r}: expected one of {DATASETS}')
  if split == 'search':
    (train_x, train_y), (test_x, test_y) = holdout(
      train_x, train_y, config.holdout, config.split_seed
    )
  num_classes = config.num_classes if config.dataset == 'synthetic' else NUM_CLASSES[config.dataset]
  return ArrayData(
    config.dataset,
    train_x,
    train_y,
    test_x,
    test_y,
    config.image_size,
    num_classes,
    process_index,
    process_count,
  )


def create_proxy_data(config, process_index: int = 0, process_count: int = 1) -> Data:
  """The paper's search split: proxy-training part and held-out part (the search's contract)."""
  return create(config, 'search', process_index, process_count)


def holdout(images, labels, count: int, seed: int):
  """(rest, held out): `count` examples drawn at random, without replacement, as the validation set."""
  if not 0 < count < len(labels):
    raise errors.UserError(
      f'holdout {count}: expected a number in (0, {len(labels)}) for this dataset'
    )
  order = np.random.default_rng(seed).permutation(len(labels))
  held, rest = order[:count], order[count:]
  return (images[rest], labels[rest]), (images[held], labels[held])


# --- in-memory datasets -------------------------------------------------------------------------


class ArrayData(Data):
  """A small dataset held in memory as uint8 images, normalised by its training part's statistics.

  The training order is a fresh permutation per epoch drawn from (seed, epoch), so batch k is the
  same whether the run started at step 0 or resumed at step k.
  """

  def __init__(
    self,
    name,
    train_x,
    train_y,
    test_x,
    test_y,
    image_size,
    num_classes,
    process_index=0,
    process_count=1,
  ):
    self.name, self.image_size, self.num_classes = name, image_size, num_classes
    self.process_count = process_count
    self.num_train, self.num_eval = len(train_y), len(test_y)
    train_x, test_x = fit_images(train_x, image_size), fit_images(test_x, image_size)
    self.mean, self.std = (float(train_x.mean()),) * 3, (float(train_x.std()),) * 3
    shard = slice(process_index, None, process_count)
    self.train_x, self.train_y = train_x[shard], train_y[shard].astype(np.int32)
    self.test_x, self.test_y = test_x[shard], test_y[shard].astype(np.int32)

  def train_batches(self, batch_size, seed, start_step=0):
    n = len(self.train_y)
    if not 0 < batch_size <= n:
      raise errors.UserError(
        f'batch size {batch_size}: expected a number in (0, {n}] for this shard of {self.name}'
      )
    steps_per_epoch = n // batch_size
    step = start_step
    while True:
      epoch, index = divmod(step, steps_per_epoch)
      order = np.random.default_rng((seed, epoch)).permutation(n)
      take = order[index * batch_size : (index + 1) * batch_size]
      yield self.train_x[take], self.train_y[take]
      step += 1

  def eval_batches(self, batch_size, limit=None):
    count = None if limit is None else math.ceil(limit / self.process_count)
    return padded_batches(
      self.test_x[:count], self.test_y[:count], self.eval_steps(batch_size, limit), batch_size
    )


def padded_batches(images, labels, steps: int, batch_size: int) -> Iterator:
  """`steps` (images, labels, mask) batches of held arrays, the last ones padded with masked zeros
  (every process yields as many batches, whatever its share)."""
  for i in range(steps):
    part = slice(min(i * batch_size, len(labels)), min((i + 1) * batch_size, len(labels)))
    pad = batch_size - len(labels[part])
    mask = np.concatenate([np.ones(len(labels[part]), np.float32), np.zeros(pad, np.float32)])
    yield (
      np.concatenate([images[part], np.zeros((pad,) + images.shape[1:], images.dtype)]),
      np.concatenate([labels[part], np.zeros(pad, np.int32)]),
      mask,
    )


def fit_images(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, H, W] or [N, H, W, C] -> [N, size, size, 3]: zero-padded when it is larger, resized
  (bilinear, antialiased) when smaller; grey images are repeated to 3 channels."""
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
    raise ValueError(f'expected square images [N, H, W(, 1|3)], got shape {images.shape}')
  height = images.shape[1]
  if size >= height:
    before = (size - height) // 2
    images = np.pad(
      images, ((0, 0), (before, size - height - before), (before, size - height - before), (0, 0))
    )
  else:
    import jax

    out = [
      np.asarray(
        jax.image.resize(
          chunk.astype(np.float32), (len(chunk), size, size, chunk.shape[3]), 'bilinear'
        )
      )
      for chunk in np.array_split(images, max(1, len(images) // 8192))
    ]
    images = np.clip(np.round(np.concatenate(out)), 0, 255).astype(np.uint8)
  return np.repeat(images, 3 // images.shape[3], axis=3)


def read_idx(path: str) -> np.ndarray:
  """An IDX file (the MNIST format: big-endian magic, dims, then uint8 data), gzipped or not."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise errors.UserError(f'{path} is not an IDX file of unsigned bytes (magic {data[:4]!r})')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != math.prod(shape):
    raise errors.UserError(f'{path} holds {array.size} bytes, its header says {shape}')
  return array.reshape(shape)


def load_fashion_mnist(data_dir: str | None = None, download: bool = False):
  """((train images, labels), (test images, labels)) from the four IDX files in `data_dir` (by
  default Debian's); where they are missing and `download` is set, from TFDS, which downloads them
  once into its own data_dir (`data_dir` then, or ~/tensorflow_datasets). Without `download` no
  network is ever tried, so an offline machine gets the how-to message at once."""
  idx_dir = data_dir or FASHION_MNIST_DIR
  parts = []
  for prefix in ('train', 't10k'):
    paths = [
      os.path.join(idx_dir, f'{prefix}-{kind}-idx{n}-ubyte')
      for kind, n in (('images', 3), ('labels', 1))
    ]
    paths = [p if os.path.exists(p) else p + '.gz' for p in paths]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing and download:
      return _fashion_mnist_from_tfds(data_dir)
    if missing:
      raise DatasetMissingError(
        f'Fashion-MNIST is not in {idx_dir} (missing {", ".join(missing)}). Install it with '
        '`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), pass '
        '--config.data.download=True to let TFDS download it, or put the four *-ubyte.gz files '
        'from https://github.com/zalandoresearch/fashion-mnist in a directory and pass '
        '--config.data.data_dir=DIR.'
      )
    parts.append((read_idx(paths[0]), read_idx(paths[1]).astype(np.int32)))
  return tuple(parts)


def _fashion_mnist_from_tfds(data_dir: str | None):
  """Through `tfds.data_source`, which reads without TensorFlow."""
  import tensorflow_datasets as tfds

  parts = []
  for split in ('train', 'test'):
    source = tfds.data_source('fashion_mnist', split=split, data_dir=data_dir, download=True)
    examples = [source[i] for i in range(len(source))]
    parts.append(
      (
        np.stack([e['image'][..., 0] for e in examples]).astype(np.uint8),
        np.array([e['label'] for e in examples], np.int32),
      )
    )
  return tuple(parts)


def load_digits(test_size: int, seed: int):
  """scikit-learn's bundled 8x8 digits (1,797 images, values 0-16), scaled to 0-255."""
  from sklearn import datasets

  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  (train_x, train_y), (test_x, test_y) = holdout(
    images, digits.target.astype(np.int32), test_size, seed
  )
  return train_x, train_y, test_x, test_y


def synthetic(num_train: int, num_eval: int, image_size: int, num_classes: int, seed: int):
  """Learnable fake images for tests: a random low-frequency template per class plus noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (num_classes, 4, 4, 3))
  templates = np.repeat(np.repeat(coarse, -(-image_size // 4), 1), -(-image_size // 4), 2)
  templates = templates[:, :image_size, :image_size]

  def draw(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = templates[labels] + rng.normal(0, 64, (n, image_size, image_size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels

  (train_x, train_y), (test_x, test_y) = draw(num_train), draw(num_eval)
  return train_x, train_y, test_x, test_y


# --- ImageNet through TFDS and tf.data ------------------------------------------------------------


def imagenet_splits(split: str, holdout_count: int) -> tuple[str, str, int, int]:
  """(train split, eval split, train size, eval size) in TFDS's split language."""
  if split == 'full':
    return 'train', 'validation', IMAGENET_SIZES['train'], IMAGENET_SIZES['validation']
  if not 0 < holdout_count < IMAGENET_SIZES['train']:
    raise errors.UserError(
      f'holdout {holdout_count}: expected a number in (0, {IMAGENET_SIZES["train"]})'
    )
  return (
    f'train[{holdout_count}:]',
    f'train[:{holdout_count}]',
    IMAGENET_SIZES['train'] - holdout_count,
    holdout_count,
  )


def _missing_imagenet(data_dir, manual_dir):
  return DatasetMissingError(
    f'TFDS imagenet2012 is not prepared in {data_dir}. TFDS cannot download ImageNet: '
    'get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from '
    'https://image-net.org/download-images.php (free account, non-commercial terms), put them '
    f'in {manual_dir}, then build it once with `tfds build imagenet2012 --data_dir={data_dir} '
    f'--manual_dir={manual_dir}` (a few hours), or pass --config.data.data_dir / '
    '--config.data.manual_dir to point at an existing copy.'
  )


def inception_crop(
  image_bytes,
  image_size: int,
  seed,
  area_range=(0.08, 1.0),
  aspect_ratio_range=(3 / 4, 4 / 3),
  max_attempts: int = 10,
):
  """Official training crop: a random box of 8-100% of the area and aspect 3/4-4/3 (10 attempts,
  else the center crop), decoded from the JPEG, resized bilinearly to `image_size`."""
  import tensorflow as tf

  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=seed,
    min_object_covered=0.1,
    aspect_ratio_range=aspect_ratio_range,
    area_range=area_range,
    max_attempts=max_attempts,
    use_image_if_no_bounding_boxes=True,
  )
  offset_y, offset_x, _ = tf.unstack(begin)
  height, width, _ = tf.unstack(size)
  # No box found: the sampler returns the whole image; the official code then takes the center crop.
  failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
  crop = tf.cond(
    failed,
    lambda: center_crop(image_bytes, image_size),
    lambda: tf.image.resize(
      tf.image.decode_and_crop_jpeg(
        image_bytes, tf.stack([offset_y, offset_x, height, width]), channels=3
      ),
      [image_size, image_size],
      'bilinear',
    ),
  )
  return crop


def center_crop(image_bytes, image_size: int):
  """Official evaluation crop: the center image_size/(image_size+32) of the shorter side, resized."""
  import tensorflow as tf

  shape = tf.image.extract_jpeg_shape(image_bytes)
  height, width = shape[0], shape[1]
  crop = tf.cast(
    image_size / (image_size + CROP_PADDING) * tf.cast(tf.minimum(height, width), tf.float32),
    tf.int32,
  )
  offset_y, offset_x = (height - crop + 1) // 2, (width - crop + 1) // 2
  image = tf.image.decode_and_crop_jpeg(
    image_bytes, tf.stack([offset_y, offset_x, crop, crop]), channels=3
  )
  return tf.image.resize(image, [image_size, image_size], 'bilinear')


def preprocess_train(image_bytes, image_size: int, seed):
  import tensorflow as tf

  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = inception_crop(image_bytes, image_size, crop_seed)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return to_uint8(image, image_size)


def preprocess_eval(image_bytes, image_size: int):
  return to_uint8(center_crop(image_bytes, image_size), image_size)


def to_uint8(image, image_size: int):
  """A resized crop (float, 0-255) rounded to uint8 [image_size, image_size, 3]: the device
  normalises it with IMAGENET_MEAN and IMAGENET_STD."""
  import tensorflow as tf

  image = tf.reshape(image, [image_size, image_size, 3])
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


class ImageNet(Data):
  """TFDS imagenet2012 read with tf.data; this process reads an even share of each split."""

  def __init__(self, config, split, process_index=0, process_count=1):
    import tensorflow_datasets as tfds

    self.name, self.num_classes, self.image_size = 'imagenet2012', 1000, config.image_size
    self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
    self.held_out = {}  # examples per process (None: all) -> this process's decoded eval images
    self.process_index, self.process_count = process_index, process_count
    self.shuffle_buffer = config.shuffle_buffer
    self.train_split, self.eval_split, self.num_train, self.num_eval = imagenet_splits(
      split, config.holdout
    )
    data_dir = config.data_dir or os.path.expanduser('~/tensorflow_datasets')
    manual_dir = config.manual_dir or os.path.join(data_dir, 'downloads', 'manual')
    self.builder = tfds.builder('imagenet2012', data_dir=data_dir)
    if not self.builder.is_prepared():
      archives = [
        os.path.join(manual_dir, f) for f in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
      ]
      if not all(os.path.exists(a) for a in archives):
        raise _missing_imagenet(data_dir, manual_dir)
      self.builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
      )

  def _read(self, split, shuffle_seed=None):
    import tensorflow_datasets as tfds

    shard = tfds.even_splits(split, n=self.process_count)[self.process_index]
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16)
    return self.builder.as_dataset(
      split=shard,
      shuffle_files=shuffle_seed is not None,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=read_config,
    )

  def train_batches(self, batch_size, seed, start_step=0):
    """A resumed run reshuffles from (seed, start_step): same distribution, not the same order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    run_seed = int(np.random.default_rng((seed, start_step, self.process_index)).integers(2**31))
    ds = self._read(self.train_split, run_seed).repeat()
    ds = ds.shuffle(self.shuffle_buffer, seed=run_seed).enumerate()
    ds = ds.map(
      lambda i, ex: (
        preprocess_train(ex['image'], self.image_size, tf.stack([tf.cast(run_seed, tf.int64), i])),
        tf.cast(ex['label'], tf.int32),
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=False,
    )
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))

  def eval_batches(self, batch_size, limit=None):
    """From memory: this process's share of the evaluation part is decoded on the first call and
    kept, so a search's children do not decode the same held-out JPEGs each (8,000 children of
    50,000 images: 400 million decodes); at 224 px the search's 50,000 take 7.5 GB of RAM."""
    count = None if limit is None else math.ceil(limit / self.process_count)
    if count not in self.held_out:
      self.held_out[count] = self._decode_eval(count)
    return padded_batches(*self.held_out[count], self.eval_steps(batch_size, limit), batch_size)

  def _decode_eval(self, count: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 center crops, int32 labels) of this process's first `count` evaluation examples."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds = self._read(self.eval_split)
    if count is not None:
      ds = ds.take(count)
    ds = ds.map(
      lambda ex: (preprocess_eval(ex['image'], self.image_size), tf.cast(ex['label'], tf.int32)),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    parts = list(tfds.as_numpy(ds.batch(1024).prefetch(tf.data.AUTOTUNE)))
    if not parts:
      return (np.zeros((0, self.image_size, self.image_size, 3), np.uint8), np.zeros(0, np.int32))
    return tuple(np.concatenate(column) for column in zip(*parts))

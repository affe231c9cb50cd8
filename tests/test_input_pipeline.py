import gzip
import os

import ml_collections
import numpy as np
import pytest

from mnasnet_jax import errors
from mnasnet_jax import input_pipeline
from mnasnet_jax.configs import train as train_config


def _data_config(dataset, image_size, **overrides):
  """A real dataset's config as the configs declare it (every key the pipeline reads)."""
  config = train_config.data_config(dataset, image_size)
  config.update(overrides)
  return config


def _config(**kw):
  base = dict(
    dataset='synthetic',
    image_size=16,
    num_classes=4,
    num_train=200,
    num_eval=50,
    holdout=40,
    split_seed=0,
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_read_idx(tmp_path):
  array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  path = tmp_path / 'x-idx3-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(
      bytes([0, 0, 8, 3]) + b''.join(d.to_bytes(4, 'big') for d in array.shape) + array.tobytes()
    )
  np.testing.assert_array_equal(input_pipeline.read_idx(str(path)), array)
  bad = tmp_path / 'bad'
  bad.write_bytes(b'\x00\x00\x09\x01abcd')
  with pytest.raises(errors.UserError, match='not an IDX file'):
    input_pipeline.read_idx(str(bad))


def test_fit_images_pads_and_resizes():
  images = np.full((2, 28, 28), 200, np.uint8)
  padded = input_pipeline.fit_images(images, 32)
  assert padded.shape == (2, 32, 32, 3)
  assert (
    padded[0, 2, 2, 0] == 200
    and padded[0, 1, 1, 0] == 0
    and padded[0, 29, 29, 2] == 200
    and padded[0, 30, 30, 2] == 0
  )
  small = input_pipeline.fit_images(images, 14)
  assert small.shape == (2, 14, 14, 3) and np.all(small == 200)


def test_search_split_holds_out_disjoint_examples():
  cfg = _config()
  data = input_pipeline.create_proxy_data(cfg)
  assert (data.num_train, data.num_eval, data.num_classes, data.image_size) == (160, 40, 4, 16)
  full = input_pipeline.create(cfg, 'full')
  assert (full.num_train, full.num_eval) == (200, 50)
  rows = {r.tobytes() for r in data.train_x} & {r.tobytes() for r in data.test_x}
  assert not rows
  with pytest.raises(errors.UserError, match=r'holdout 200: expected a number in \(0, 200\)'):
    input_pipeline.create_proxy_data(_config(holdout=200))


def test_train_batches_resume_and_cover_an_epoch():
  data = input_pipeline.create(_config(), 'full')
  first = [b for _, b in zip(range(7), data.train_batches(32, seed=3))]
  resumed = [b for _, b in zip(range(3), data.train_batches(32, seed=3, start_step=4))]
  for a, b in zip(first[4:], resumed):
    np.testing.assert_array_equal(a[0], b[0])
  epoch = np.concatenate([b[1] for b in first[:6]])  # 200 // 32 = 6 steps per epoch
  assert (
    len(epoch) == 192 and first[0][0].dtype == np.uint8 and first[0][0].shape == (32, 16, 16, 3)
  )


def test_process_shards_and_padded_eval():
  cfg = _config()
  shards = [input_pipeline.create(cfg, 'full', i, 3) for i in range(3)]
  steps = [len(list(s.eval_batches(8))) for s in shards]
  assert steps == [shards[0].eval_steps(8)] * 3 == [3] * 3  # ceil(ceil(50 / 3) / 8)
  total = sum(float(m.sum()) for s in shards for _, _, m in s.eval_batches(8))
  assert total == 50
  limited = sum(float(m.sum()) for s in shards for _, _, m in s.eval_batches(8, limit=30))
  assert limited == 30


def test_fashion_mnist_and_digits():
  if os.path.exists(input_pipeline.FASHION_MNIST_DIR):
    data = input_pipeline.create_proxy_data(_data_config('fashion_mnist', 32, holdout=10_000))
    assert (data.num_train, data.num_eval, data.num_classes) == (50_000, 10_000, 10)
    images, labels = next(data.train_batches(64, 0))
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert abs(float(images.mean()) - data.mean[0]) < 0.5 * data.std[0]
  digits = input_pipeline.create(_data_config('digits', 16), 'full')
  assert (digits.num_train, digits.num_eval) == (1437, 360)


def test_missing_dataset_says_how_to_get_it(tmp_path):
  cfg = _data_config('fashion_mnist', 32, holdout=10, data_dir=str(tmp_path))
  with pytest.raises(
    input_pipeline.DatasetMissingError, match='apt-get install dataset-fashion-mnist'
  ):
    input_pipeline.create_proxy_data(cfg)
  cfg = _data_config('imagenet2012', 32, data_dir=str(tmp_path))
  with pytest.raises(input_pipeline.DatasetMissingError, match='ILSVRC2012_img_train.tar'):
    input_pipeline.create_proxy_data(cfg)


def test_fashion_mnist_through_tfds_only_when_asked(tmp_path):
  import tensorflow_datasets as tfds

  with pytest.raises(input_pipeline.DatasetMissingError, match='download=True'):
    input_pipeline.load_fashion_mnist(str(tmp_path))  # no network tried
  with tfds.testing.mock_data(num_examples=12):
    (train_x, train_y), (test_x, test_y) = input_pipeline.load_fashion_mnist(
      str(tmp_path), download=True
    )
  assert train_x.shape == test_x.shape == (12, 28, 28) and train_x.dtype == np.uint8
  assert train_y.dtype == np.int32 and 0 <= train_y.min() and train_y.max() < 10


def test_imagenet_split_arithmetic():
  assert input_pipeline.imagenet_splits('search', 50_000) == (
    'train[50000:]',
    'train[:50000]',
    1_231_167,
    50_000,
  )
  assert input_pipeline.imagenet_splits('full', 50_000) == (
    'train',
    'validation',
    1_281_167,
    50_000,
  )


def test_imagenet_preprocessing_on_a_jpeg():
  tf = pytest.importorskip('tensorflow')
  # A 60x90 image: left half 0, right half 255 in every channel.
  image = np.zeros((60, 90, 3), np.uint8)
  image[:, 45:] = 255
  jpeg = tf.io.encode_jpeg(image, quality=100)
  out = input_pipeline.preprocess_eval(jpeg, 32).numpy()
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8  # the device normalises it
  # Center crop: int(32/64 * 60) = 30 pixels square from the center, resized: half dark, half light.
  assert out[:, :14].max() < 30 and out[:, 18:].min() > 225
  crops = [
    input_pipeline.preprocess_train(jpeg, 32, tf.constant([s, 1], tf.int64)).numpy()
    for s in range(4)
  ]
  assert all(c.shape == (32, 32, 3) for c in crops)
  np.testing.assert_array_equal(
    crops[0], input_pipeline.preprocess_train(jpeg, 32, tf.constant([0, 1], tf.int64)).numpy()
  )
  assert any(not np.array_equal(crops[0], c) for c in crops[1:])


def test_imagenet_pipeline_with_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  cfg = _data_config('imagenet2012', 24, data_dir=str(tmp_path), shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=12):
    import unittest.mock

    with unittest.mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
      data = input_pipeline.create(cfg, 'search', 1, 2)
      images, labels = next(data.train_batches(4, seed=0))
      assert images.shape == (4, 24, 24, 3) and images.dtype == np.uint8 and labels.shape == (4,)
      assert (data.mean, data.std) == (input_pipeline.IMAGENET_MEAN, input_pipeline.IMAGENET_STD)
      reads = []
      read = data._read
      data._read = lambda *args: reads.append(args) or read(*args)
      batches = list(data.eval_batches(4, limit=10))
      assert len(batches) == data.eval_steps(4, limit=10) == 2
      assert sum(float(m.sum()) for _, _, m in batches) == 5
      assert all(b[0].dtype == np.uint8 and b[0].shape == (4, 24, 24, 3) for b in batches)
      # Decoded once: every later evaluation (each child's) is served from memory.
      again = list(data.eval_batches(4, limit=10))
      assert len(reads) == 1
      for a, b in zip(batches, again):
        for x, y in zip(a, b):
          np.testing.assert_array_equal(x, y)

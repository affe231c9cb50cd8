"""SSDLite detection (paper section 6.3): `python launch/main.py --config=configs/detection.py[:ARG]`.

`configs/detection.py` is the MobileNetV2 paper's SSDLite as the TF OD API's
ssdlite_mobilenet_v2_coco config sets it, on MnasNet-A1 at 320x320 (the MnasNet paper's), on TFDS
coco/2017 (train, evaluated on validation). ARG: `local` trains on Fashion-MNIST objects placed on
canvases, offline on this CPU, in minutes; `resolution=N` sets the input size. `--config.arch` takes
a named architecture or block strings; `--config.init_from` a classification checkpoint (a train
workdir, a timm or torchvision file) whose backbone weights the detector starts from.
"""

import ml_collections
from ml_collections import config_dict

from mnasnet_jax.configs import common


def get_config(arg=None):
  arg = common.parse_local_arg(arg)
  config = ml_collections.ConfigDict()
  config.job = 'detect'
  config.arch = 'mnasnet_a1'
  config.depth_multiplier = 1.0
  config.padding = 'same'
  config.bn_epsilon = 1e-3
  config.resolution = arg.resolution or (128 if arg.local else 320)
  config.seed = 0
  # Start from a classification checkpoint's backbone (its model replaces arch, depth_multiplier,
  # padding and bn_epsilon); None: from scratch.
  config.init_from = config_dict.placeholder(str)
  config.source_model = config_dict.placeholder(str)

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'fashion_mnist_canvases' if arg.local else 'coco/2017'
  config.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or Fashion-MNIST's IDX dir
  config.data.download = False  # let TFDS download and prepare coco/2017 (about 25 GB)
  config.data.shuffle_buffer = 2048
  config.data.max_boxes = 100  # objects per training image (COCO has at most 93 non-crowd)
  # Fashion-MNIST canvases: items (28 px, scaled to item_scale) on canvas_size canvases.
  config.data.canvas_size = 128
  config.data.objects = (1, 4)
  config.data.item_scale = (20, 64)
  config.data.num_train = 12_000
  config.data.num_eval = 500
  config.data.split_seed = 0
  # ssd_random_crop's settings (TF OD API preprocessor defaults), then a horizontal flip.
  config.data.augmentation = ml_collections.ConfigDict()
  config.data.augmentation.crop_area = (0.1, 1.0)
  config.data.augmentation.crop_aspect_ratio = (0.5, 2.0)
  config.data.augmentation.crop_attempts = 100
  config.data.augmentation.keep_original_probability = 0.15

  # SSDLite: anchors, extra layers, predictors, matching, loss, post-processing.
  config.anchors = ml_collections.ConfigDict()
  config.anchors.min_scale = 0.2
  config.anchors.max_scale = 0.95
  config.anchors.aspect_ratios = (1.0, 2.0, 0.5, 3.0, 0.3333)
  config.anchors.interpolated_scale_aspect_ratio = 1.0
  config.anchors.reduce_boxes_in_lowest_layer = True
  config.ssd = ml_collections.ConfigDict()
  config.ssd.extra_depths = (512, 256, 256, 128)
  config.ssd.min_depth = 16
  config.ssd.class_prior_bias = -4.6
  config.ssd.match_threshold = 0.5
  config.ssd.box_scales = (10.0, 10.0, 5.0, 5.0)
  config.ssd.negatives_per_positive = 3.0
  config.ssd.min_negatives = 3
  config.ssd.localization_weight = 1.0
  config.ssd.classification_weight = 1.0
  config.nms = ml_collections.ConfigDict()
  config.nms.score_threshold = 1e-8
  config.nms.iou_threshold = 0.6
  config.nms.max_per_class = 100
  config.nms.max_total = 100

  # Training: TF OD API's SSDLite recipe (RMSProp, lr 0.004 at batch 24, x0.95 every 800,720
  # steps, 200K steps, L2 4e-5) through train.py's RMSProp-TF, schedule and EMA.
  config.batch_size = 24
  config.num_steps = 200_000
  config.base_learning_rate = 0.004 * 256 / 24  # per 256 images
  config.warmup_epochs = 0.0
  config.lr_decay_rate = 0.95
  config.lr_decay_epochs = 800_720 * 24 / 118_287
  config.rmsprop_decay = 0.9
  config.momentum = 0.9
  config.rmsprop_epsilon = 1.0
  config.weight_decay = 4e-5
  config.ema_decay = 0.0  # 0: none, as the TF OD API config
  config.bn_momentum = 0.9997
  config.bn_group_size = config_dict.placeholder(int)  # None: the whole global batch
  # Training batches over which BN statistics are re-estimated before each evaluation (0: the
  # running averages, as the TF OD API over its 200K steps).
  config.bn_recalibration_batches = 0
  config.depthwise = 'auto'
  config.conv = 'auto'
  config.dtype = 'auto'

  # Operations.
  config.eval_batch_size = 32
  config.eval_examples = config_dict.placeholder(int)  # None: the whole evaluation split
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 1000
  config.checkpoints_to_keep = 3
  config.picture_images = 6  # DIR/detections.png: predicted boxes on the first evaluation images
  config.picture_min_score = 0.3
  # TFLite export after training: DIR/detector.tflite (boxes and class scores out, NMS after the
  # graph), checked against the JAX outputs and timed (profiler's litert backend).
  config.export = True
  config.latency = ml_collections.ConfigDict()
  config.latency.instances = 3
  config.latency.warmup = 5
  config.latency.repeats = 20
  config.latency.num_threads = 1

  if arg.local:
    config.arch = 'mnasnet_small'
    config.batch_size = 32
    config.num_steps = 1500  # 4 epochs of the 12,000 canvases
    # From scratch in minutes: RMSProp's epsilon at the classification recipe's 1e-3 (the
    # detection recipe's 1.0 turns the class logits' small gradients into far smaller steps: with
    # it, the classification loss of a 1,000-step run stalled), peak 0.004. A run this short ends
    # with weights moving faster than BN's running averages follow: its statistics are
    # re-estimated before evaluation.
    config.rmsprop_epsilon = 1e-3
    config.base_learning_rate = 0.004 * 256 / 32
    config.warmup_epochs = 0.25
    config.lr_decay_rate = 0.9
    config.lr_decay_epochs = 1.0
    config.bn_momentum = 0.99
    config.bn_recalibration_batches = 20
    config.eval_batch_size = 50
    config.picture_min_score = 0.15  # a short run's scores are low
    config.log_every_steps = 50
    config.eval_every_steps = 1500
    config.checkpoint_every_steps = 500
  return config

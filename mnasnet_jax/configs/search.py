"""The MnasNet search (paper section 4-5): `python launch/main.py --config=configs/search.py[:ARG]`.

`configs/search.py` is the paper's search on ImageNet; `configs/search.py:local` a small real search
on this CPU, offline, on Fashion-MNIST. `resolution=N` (e.g. `:local,resolution=64`) sets the
children's image size and, with it, the latency table: the shipped one of that resolution (32 and
224 ship; profile another with `configs/profile_latency.py` and the same ARG, and pass its path
as `--config.latency.table`).
"""

import copy

import ml_collections

from mnasnet_jax import models
from mnasnet_jax.configs import common
from mnasnet_jax.configs import train


def search_space_config():
  """The factorised hierarchical space on MobileNetV2's seven blocks (owned by search_space.py)."""
  space = ml_collections.ConfigDict()
  # The base network: MobileNetV2 1.0's (t, c, n, s) table in MnasNet's layers, stem 32.
  base = models.ARCHITECTURES['mobilenet_v2']
  space.stem_filters = base.stem_filters
  space.base_blocks = base.blocks
  space.searched_blocks = (0, 1, 2, 3, 4, 5, 6)  # the others keep their base block string
  # The options of each decision (paper 4.2): 4 * 2 * 2 * 3 * 3 * 3 = 432 per searched block.
  space.conv_ops = ('conv', 'sepconv', 'mbconv3', 'mbconv6')
  space.kernels = (3, 5)
  space.se_ratios = (0.0, 0.25)
  space.skip_ops = ('pool', 'identity', 'none')
  space.filter_multipliers = (0.75, 1.0, 1.25)
  space.layer_deltas = (-1, 0, 1)
  return space


def controller_config(local: bool):
  """The search strategy: PPO-trained LSTM controller, or evolution / random (controller.py)."""
  controller = ml_collections.ConfigDict()
  controller.strategy = 'ppo'  # 'ppo' (the paper's), 'reinforce' (TuNAS's), 'evolution', 'random'
  # NASNet's controller: a one-layer LSTM with 100 units, trained with PPO and Adam.
  controller.ppo = ml_collections.ConfigDict()
  controller.ppo.hidden_size = 100
  controller.ppo.init_range = 0.1  # uniform(-0.1, 0.1) LSTM and embedding weights; heads start at 0
  # Set from benchmarks/controller.py at batches of 64 children: its docstring has the figures.
  controller.ppo.learning_rate = 3e-3
  controller.ppo.max_grad_norm = 1.0
  controller.ppo.clip_epsilon = 0.2
  controller.ppo.epochs = 3  # passes over each batch of children
  controller.ppo.minibatch_size = 32
  controller.ppo.entropy_weight = 1e-3  # keeps the faster updates from collapsing the policy
  controller.ppo.baseline_decay = 0.9
  controller.ppo.normalize_advantages = True  # divide advantages by the batch's reward std
  # < 1: learn from that top fraction of each batch alone (risk-seeking policy gradient).
  controller.ppo.top_fraction = 0.25
  controller.ppo.temperature = 1.0
  if local:
    # Batches of 4 (search.children_per_step): a top quarter is one child and a batch's spread is
    # noise, so learn from all four with raw advantages, at a smaller rate (benchmarks/controller.py
    # at batch 4: its docstring has the figures).
    controller.ppo.learning_rate = 5e-4
    controller.ppo.normalize_advantages = False
    controller.ppo.top_fraction = 1.0
  # TuNAS's REINFORCE on independent per-decision logits (the one-shot search's default).
  controller.reinforce = ml_collections.ConfigDict()
  # Adam on the logits. Replayed against one finished :oneshot_local supernet, frozen (240 children
  # in batches of 8, 3 seeds a rate), the answers' shared-weights reward on all held-out images was
  # 0.646, 0.681, 0.667, 0.642, 0.648 at rates 0.05, 0.1, 0.15, 0.25, 0.5 (README, "Search on
  # shared weights").
  controller.reinforce.learning_rate = 0.1
  controller.reinforce.baseline_decay = 0.95
  controller.reinforce.entropy_weight = 0.0
  # Regularised evolution (Real et al. 2019).
  controller.evolution = ml_collections.ConfigDict()
  controller.evolution.population_size = 64
  controller.evolution.sample_size = 16
  return controller


def reward_config():
  """ACC * (LAT / T)^w and the other published rewards (reward.py)."""
  reward = ml_collections.ConfigDict()
  reward.kind = 'soft'  # 'soft', 'hard' (paper eq. 2), 'capped' or 'absolute' (TuNAS)
  # None takes the kind's preset: soft -0.07 / -0.07, hard 0 / -1, capped beta -0.07, absolute -0.1.
  reward.alpha = ml_collections.config_dict.placeholder(float)
  reward.beta = ml_collections.config_dict.placeholder(float)
  # The paper's T = 75 ms on a Pixel 1; None means the latency table's figure for mobilenet_v2.
  reward.target_ms = ml_collections.config_dict.placeholder(float)
  return reward


def search_loop_config(arg=None):
  """The loop: budget, batching into controller steps, failures, resume and report (search.py)."""
  local = common.parse_local_arg(arg).local
  search = ml_collections.ConfigDict()
  # The paper samples about 8,000 children; the policy is updated once per `children_per_step`.
  search.num_children = 16 if local else 8000
  search.children_per_step = 4 if local else 64
  search.seed = 0  # the strategy's state (and with it every sample) derives from this seed
  search.train_seed = 0  # child `trial` is proxy-trained with seed train_seed + trial
  # A child whose training raises or diverges gets this reward (no soft or hard reward is lower);
  # one that fits the device's memory in no way is recorded as 'oom', with no reward, and not told.
  search.failure_reward = 0.0
  search.max_consecutive_failures = 10  # more in a row (oom apart) means a broken setup: stop
  search.keep_checkpoints = 3
  search.report_every_steps = 1 if local else 10
  search.report_top_k = 5 if local else 15  # the paper trains its top 15 in full
  search.train_config = 'configs/train.py' + (f':{arg}' if arg else '')  # in best.md's commands
  # JAX's persistent compilation cache (every child is a new program), by default WORKDIR/jax_cache.
  search.compilation_cache = True
  search.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
  search.cache_min_compile_seconds = 0.5
  return search


def data_and_proxy_config(arg=None):
  """The paper's proxy task (section 4): 5 epochs on ImageNet train with 50,000 images held out as
  the validation set that gives ACC(m); locally a few hundred steps on Fashion-MNIST at 32x32.
  The proxy recipe is configs/train.py's with the same ARG (RMSProp-TF, schedule, L2, label
  smoothing, BN momentum) cut short."""
  recipe = train.get_config(arg)
  data = recipe.data
  data.split = 'search'
  proxy = ml_collections.ConfigDict(
    {
      k: v
      for k, v in recipe.items()
      if k
      not in (
        'job',
        'arch',
        'init_from',
        'source_model',
        'seed',
        'data',
        'log_every_steps',
        'eval_every_steps',
        'checkpoint_every_steps',
        'checkpoints_to_keep',
      )
    }
  )
  # Steps between checks for a non-finite loss (a check waits for the device to catch up).
  proxy.check_every_steps = 20
  if common.parse_local_arg(arg).local:
    proxy.batch_size = 64
    proxy.num_steps = 100
    # The rate falls 3% a step from the first (RMSProp-TF's mean square, starting at 1, is its
    # warm-up), to 5% of its peak at step 100: the decay period is one step, in epochs of the
    # search split's proxy-training images (Fashion-MNIST's 60,000 less those held out). Ending at
    # the peak instead (the recipe's warm-up and decay every 390 steps), a child's score was as
    # much its seed's as its architecture's (benchmarks/proxy_ranking.py's docstring). Another
    # --config.proxy.batch_size needs its own --config.proxy.lr_decay_epochs.
    proxy.warmup_epochs = 0.0
    proxy.lr_decay_rate = 0.97
    proxy.lr_decay_epochs = proxy.batch_size / (60_000 - data.holdout)
    proxy.base_learning_rate = 0.032  # 0.008 at batch 64
    proxy.ema_decay = 0.0  # too few steps for a moving average to help
    # 100 steps end with weights moving too fast for BN's running averages to follow (children at
    # chance with them, far above it with batch statistics): re-estimate them after training.
    proxy.bn_recalibration_batches = 20
    proxy.dropout_rate = 0.0
    proxy.eval_examples = 2000  # of the 10,000 held out
    # The official classifier range, not the local recipe's: in 100 steps ImageNet's ranked the
    # children against a second seed at Kendall 0.31, this 0.58 (benchmarks/proxy_ranking.py).
    proxy.classifier_init_range = ml_collections.config_dict.placeholder(float)
  else:
    proxy.num_epochs = 5.0
    proxy.warmup_epochs = 1.0
    proxy.bn_recalibration_batches = 0  # 5 epochs at BN momentum 0.99: the paper's running averages
  return data, proxy


def oneshot_config(local: bool):
  """The search on shared weights (oneshot.py; TuNAS's): a supernet warm-up on uniformly sampled
  children, then each sampled child trains the supernet as itself and is rewarded by the shared
  weights' held-out accuracy."""
  oneshot = ml_collections.ConfigDict()
  # Supernet steps on uniformly drawn children before the first controller step. Locally, children
  # drawn from the whole space stay at chance for about 1,750 steps and only then learn (37.5%
  # training top-1 over steps 2,751-3,000; README, "Search on shared weights"), so the warm-up runs
  # well past that; a supernet step runs only the child's ops (supernet.switch), 0.105 s on 2 Zen 4
  # cores, 0.07-0.08 s on 2 Zen 5 cores, where the whole local budget (warm-up, 240 children of 2
  # steps, their rewards, 8 finalists) took 10-11 minutes (README, "Search on shared weights").
  # On ImageNet (300 steps an epoch at batch 4096, 50,000 images held out) the whole is 90 epochs.
  oneshot.warmup_steps = 5000 if local else 7000
  # > 0: over the warm-up's first steps, children mostly the largest (oneshot.warmup_tokens; as
  # TuNAS's filter and op warm-up). Locally 750 of them had drawn children learning within 1,000
  # steps, not 1,750, but after 2,000 steps so begun the shared weights ranked 20 architectures at
  # Kendall -0.13, after 3,000 uniform ones at 0.32 and 0.15 (two seeds): off until a search shows
  # it ranks as well (README, "Search on shared weights").
  oneshot.largest_first_steps = 0
  oneshot.train_steps_per_child = 2 if local else 5  # supernet steps each sampled child trains
  oneshot.eval_batches = 1  # held-out batches per child's reward
  oneshot.eval_batch_size = 128 if local else 1024
  oneshot.eval_examples = 2000 if local else 10_000  # the held-out images rewards cycle through
  oneshot.checkpoint_every_steps = 500 if local else 2000  # during the warm-up
  # Children trained alone after the search (the policy's answer, then the next distinct ones the
  # strategy samples), the best by reward the answer: shared weights cannot see how fast a child
  # trains from scratch (oneshot.py). Each costs one multi-trial child: locally 8 took 104-126 s
  # of 614-658 s on 2 Zen 5 cores (README, "Search on shared weights"); on ImageNet 8 are 40
  # epochs of a child against the supernet's 90 epochs of its wider steps.
  oneshot.finalists = 8
  return oneshot


def get_config(arg=None):
  """`arg` takes the keys of common.parse_local_arg and `oneshot` (the search on shared weights,
  oneshot.py) or `oneshot_local` (the same, locally)."""
  given = common.parse_arg(
    arg, local=False, resolution=(None, int), oneshot=False, oneshot_local=False
  )
  if given.oneshot or given.oneshot_local:
    local = given.local or given.oneshot_local
    rest = ','.join(['local'] * local + [f'resolution={given.resolution}'] * bool(given.resolution))
    config = get_config(rest or None)
    return oneshot_search(config, local)
  return multi_trial_config(arg)


def oneshot_search(config, local: bool):
  """The one-shot search's config: the multi-trial one's space, strategy, reward, data and recipe,
  with its own budget."""
  config.job = 'oneshot'
  config.oneshot = oneshot_config(local)
  # The finalists' training: the multi-trial search's proxy, before the supernet's changes below.
  config.oneshot.finalist_proxy = copy.deepcopy(config.proxy)
  config.reward.kind = 'absolute'  # TuNAS's, recommended on shared weights
  # TuNAS's controller: independent logits, REINFORCE, updated every `children_per_step` children.
  config.controller.strategy = 'reinforce'
  # Locally, 480 children train the policy further (replayed against one finished search's frozen
  # supernet, 3 seeds: its answers' shared-weights reward 0.677, after 240 0.628), but three
  # searches of 480 answered architectures that retrained no better than three of 240: mean
  # rewards over five training seeds 0.779, 0.790, 0.732 against 0.786, 0.766, 0.811, and two
  # more (search seeds 3, 4) 0.713, 0.772 against 0.678, 0.775 (README, "Search on shared
  # weights").
  config.search.num_children = 240 if local else 4000
  config.search.children_per_step = 8 if local else 64
  config.search.report_every_steps = 5 if local else 25
  config.proxy.ema_decay = 0.0  # the shared weights serve another child every step
  if local:
    # The supernet trains through the whole search: a short warm-up, then the recipe's decay (not
    # the local proxy's fall to 5% within its 100 steps).
    recipe = train.get_config('local')
    config.proxy.base_learning_rate = 0.016  # 0.004 at batch 64
    config.proxy.warmup_epochs = 0.1
    config.proxy.lr_decay_rate = recipe.lr_decay_rate
    config.proxy.lr_decay_epochs = recipe.lr_decay_epochs
    # The local recipe's (ImageNet's) classifier range, not the official one's ten times wider:
    # a supernet whose features change with every child does not recover from first logits with
    # a standard deviation near 5 (README, "Search on shared weights").
    config.proxy.classifier_init_range = recipe.classifier_init_range
  config.proxy.bn_recalibration_batches = 0  # each reward batch's own statistics (oneshot.py)
  config.proxy.num_steps = config.oneshot.warmup_steps + (
    config.search.num_children * config.oneshot.train_steps_per_child
  )
  return config


def multi_trial_config(arg=None):
  parsed = common.parse_local_arg(arg)
  config = ml_collections.ConfigDict()
  config.job = 'search'
  config.search_space = search_space_config()
  config.controller = controller_config(parsed.local)
  config.reward = reward_config()
  config.search = search_loop_config(arg)
  # The latency lookup table (mnasnet_jax/latency): a shipped table's name or a path; its resolution
  # and classes must be the children's. Profile another with configs/profile_latency.py.
  config.latency = ml_collections.ConfigDict()
  config.latency.table = f'litert_cpu_{common.image_size(parsed)}.json'
  config.data, config.proxy = data_and_proxy_config(arg)
  if parsed.local:
    config.search_space.layer_deltas = (-1, 0)  # at most MobileNetV2's depth: compiles within reach
  return config

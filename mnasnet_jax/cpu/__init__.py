"""The forms of MnasNet's ops that XLA:CPU trains fast, by the name `platform` selects them with.

The model (models.py) holds the native forms, the ones TPU/GPU compilers and TFLite know; these are
the same computations written around XLA:CPU's slow paths (platform.py says which and why):
forms.py (depthwise conv as shifted multiply-adds, regular conv as a matrix product),
depthwise_kernel.py (the depthwise conv as a compiled C++ custom call) and batch_norm.py (BatchNorm
with its gradient in closed form).
"""

from mnasnet_jax.cpu import batch_norm
from mnasnet_jax.cpu import depthwise_kernel
from mnasnet_jax.cpu import forms

DEPTHWISE = {'shifted': forms.depthwise_shifted, 'kernel': depthwise_kernel.depthwise}
CONV = {'matmul': forms.conv_matmul}
BATCH_NORM = {'closed_form': batch_norm.BatchNorm}
# Custom calls registered for XLA:CPU alone: another backend cannot run them.
CPU_ONLY = frozenset({'kernel'})

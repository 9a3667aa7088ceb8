"""Pure tensor maths: no Trainer, no PEFT, no I/O. Each function is testable with three lines of torch."""

from collections.abc import Callable

import torch

#: a sum over ranks of a small tensor (``robustft.core.distributed.all_reduce_sum``), for maths on local
#: shards
Reduce = Callable[[torch.Tensor], torch.Tensor]

"""The s3prl plugin: pretrain expert and data, runner bridges, DDP, the target store builder."""

from s3prl_ekd.stack import require_stack

require_stack()

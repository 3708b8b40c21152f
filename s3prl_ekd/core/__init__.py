"""The method: configs, frames, teachers, aggregation, student, loss, objective, precision."""

from s3prl_ekd.stack import require_stack

# An ImportError whose message names the stack to install, instead of an error deep inside s3prl.
require_stack()

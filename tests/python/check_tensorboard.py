"""Reads the event file the test suite wrote (tests/suite/training.rs) with TensorBoard's own loader and checks
sd-scripts' tags. Run by .ci/run.

usage: python check_tensorboard.py target/tmp/tb-cross/run1-tb  (logging_dir/{log_prefix}{output_name})
"""
import glob
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

files = glob.glob(f"{sys.argv[1]}/events.out.tfevents.*")
assert len(files) == 1, files
acc = EventAccumulator(sys.argv[1])
acc.Reload()
tags = set(acc.Tags()["scalars"])
for tag in ["loss/current", "loss/average", "loss/epoch", "lr/unet", "lr/textencoder"]:
    assert tag in tags, (tag, tags)
steps = [e.step for e in acc.Scalars("loss/current")]
assert steps == [1, 2, 3, 4], steps
print(f"{files[0]}: TensorBoard reads {sorted(tags)}")

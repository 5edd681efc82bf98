"""The one environment capture every record uses (qna_triton.env) and the benchmarks' view of it."""

import datetime
import platform

import torch

import qna_triton
from benchmarks.env import detect_env
from qna_triton.env import capture_environment, utc_now


def test_cpu_environment_names_versions_and_date():
    env = capture_environment("cpu")
    assert env.device_type == "cpu" and env.device_name.startswith("cpu (")
    assert env.capability is None and env.memory_bytes is None
    assert env.torch == torch.__version__ and env.python == platform.python_version()
    assert env.qna_triton == qna_triton.__version__ and env.cuda == torch.version.cuda
    date = datetime.datetime.fromisoformat(env.date)
    assert date.utcoffset() == datetime.timedelta(0) and date.microsecond == 0
    assert set(env.as_dict()) >= {"device_name", "torch", "triton", "cuda", "python", "date"}
    assert datetime.datetime.fromisoformat(utc_now()) >= date


def test_benchmark_rows_take_the_same_capture():
    e, env = detect_env(torch.device("cpu"), smoke=True), capture_environment("cpu")
    assert (e.device, e.gpu, e.torch, e.cuda) == ("cpu", env.device_name, env.torch, "none")
    assert e.triton == (env.triton or "unavailable") and e.smoke

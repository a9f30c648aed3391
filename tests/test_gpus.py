"""GPUs re-detected while a node runs: NVML, the one boundary faked, is a stand-in `pynvml` module on the path
of a real node process, reading its GPUs from a file the test edits."""
from __future__ import annotations

import json
from pathlib import Path

from tests.cluster import NodeProcess, StateRemote, wait_for

FAKE_PYNVML = '''
"""A stand-in for pynvml: the GPUs are whatever the JSON file in $WINSLOW_FAKE_NVML lists right now."""
import json, os
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


def _gpus():
    with open(os.environ["WINSLOW_FAKE_NVML"]) as handle:
        return json.load(handle)["gpus"]


def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return len(_gpus())
def nvmlDeviceGetHandleByIndex(index): return _gpus()[index]
def nvmlDeviceGetName(handle): return handle["name"]
def nvmlDeviceGetUUID(handle): return handle["uuid"]
def nvmlDeviceGetMemoryInfo(handle): return SimpleNamespace(total=handle["memory"], used=0)
def nvmlDeviceGetUtilizationRates(handle): return SimpleNamespace(gpu=50)
def nvmlDeviceGetTemperature(handle, sensor): return 40
'''
GPU = {"name": "NVIDIA H200", "uuid": "GPU-0000-test", "memory": 141 * 2**30}
PIPELINE = ("name: gpu\nstages:\n  - name: detect\n    image: none\n    command: [sleep, '60']\n"
            "    resources: {gpus: 1}\n")


def test_a_gpu_that_vanishes_ends_its_run_lost_and_one_that_appears_takes_work(tmp_path: Path) -> None:
    fake = tmp_path / "fake-nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps({"gpus": [GPU]}))
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/gpu.yaml": PIPELINE, "projects/p/project.yaml": "pipeline: gpu\nrun: {request: 1}\n"},
                 "p needs a GPU")
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work",
                       env={"PYTHONPATH": str(fake), "WINSLOW_FAKE_NVML": str(gpus)})
    try:
        wait_for(lambda: (remote.status("p").get("runs") or [{}])[0].get("started"), 30, "detect to start on GPU 0")
        assert remote.status("p")["runs"][0]["gpus"] == [0]
        gpus.write_text(json.dumps({"gpus": []}))  # it fell off the bus
        wait_for(lambda: remote.status("p")["runs"][0]["state"] == "LOST", 30, "the run on it to end LOST")
        run = remote.status("p")["runs"][0]
        assert "GPU 0 of ws-1 vanished" in run["reason"]
        wait_for(lambda: "no live node could ever run detect" in (remote.status("p").get("message") or ""), 30,
                 "the retry to say no node has a GPU")
        gpus.write_text(json.dumps({"gpus": [GPU]}))  # back (a driver reloaded)
        wait_for(lambda: len(remote.status("p").get("runs") or []) == 2, 30, "the retry to be claimed on it")
        assert "GPUs changed" in node.log()
    finally:
        node.stop()

"""A node reports its capacity and load; NVML is faked at the pynvml boundary, psutil is real."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from jsonschema import Draft202012Validator

from reconciler.heartbeat import node_document
from reconciler.machine import LoadSampler, Nvml, read_capacity
from reconciler.model import Gpu, NodeInfo
from reconciler.resources import schema_dir

GiB = 1024**3


class FakeNvmlError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakePynvml:
    """The pynvml functions Winslow calls, for two known GPUs."""

    NVML_TEMPERATURE_GPU = 0
    GPUS = [
        {"name": "NVIDIA RTX A6000", "uuid": "GPU-aaaaaaaa-0000", "total": 48 * GiB, "used": 10 * GiB,
         "util": 87, "temp": 71},
        {"name": b"NVIDIA GeForce RTX 3090", "uuid": b"GPU-bbbbbbbb-1111", "total": 24 * GiB, "used": 0,
         "util": 0, "temp": 34},
    ]

    def __init__(self) -> None:
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.GPUS)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.GPUS[index]

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> Any:
        return handle["name"]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> Any:
        return handle["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(total=handle["total"], used=handle["used"], free=handle["total"] - handle["used"])

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(gpu=handle["util"], memory=0)

    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle["temp"]


class NoDriverPynvml(FakePynvml):
    def nvmlInit(self) -> None:
        raise FakeNvmlError("Driver Not Loaded")


class NoSensorPynvml(FakePynvml):
    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        raise FakeNvmlError("Not Supported")


@pytest.fixture(scope="module")
def node_schema() -> Draft202012Validator:
    schema = json.loads((schema_dir() / "node.schema.json").read_text())
    assert schema["$id"] == "https://winslow.dev/schema/node.schema.json"
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def assert_valid(validator: Draft202012Validator, document: dict[str, Any]) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []


def test_capacity_reports_cpus_memory_and_the_gpus_nvml_sees():
    capacity = read_capacity(Nvml(FakePynvml()))

    assert capacity["cpus"] == psutil.cpu_count()
    assert capacity["memory"] == psutil.virtual_memory().total
    assert capacity["gpus"] == [
        {"index": 0, "uuid": "GPU-aaaaaaaa-0000", "model": "NVIDIA RTX A6000", "memory": 48 * GiB},
        {"index": 1, "uuid": "GPU-bbbbbbbb-1111", "model": "NVIDIA GeForce RTX 3090", "memory": 24 * GiB},
    ]


def test_without_a_driver_there_are_no_gpus_and_it_is_said_once(caplog):
    nvml = Nvml(NoDriverPynvml())

    with caplog.at_level(logging.INFO, logger="reconciler.machine"):
        capacity = read_capacity(nvml)
        sampler = LoadSampler(nvml=nvml)
        load = sampler.sample()
        sampler.sample()

    assert capacity["gpus"] == []
    assert load["gpus"] == []
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "Driver Not Loaded" in caplog.records[0].getMessage()


def test_this_machine_without_nvml_arguments_reports_without_raising():
    capacity = read_capacity()

    assert isinstance(capacity["gpus"], list)
    assert capacity["cpus"] >= 1


def test_load_reports_gpu_utilisation_memory_and_temperature():
    sampler = LoadSampler(interval=5, nvml=Nvml(FakePynvml()))

    load = sampler.sample()

    assert load["gpus"] == [
        {"index": 0, "utilization": 87, "memory_used": 10 * GiB, "temperature": 71},
        {"index": 1, "utilization": 0, "memory_used": 0, "temperature": 34},
    ]


def test_a_gpu_without_a_temperature_sensor_leaves_only_that_value_out():
    load = LoadSampler(nvml=Nvml(NoSensorPynvml())).sample()

    assert load["gpus"][0] == {"index": 0, "utilization": 87, "memory_used": 10 * GiB}


def test_load_reports_cpu_memory_and_network_rates_small_and_rounded():
    sampler = LoadSampler(interval=5, nvml=Nvml(NoDriverPynvml()))

    load = sampler.sample()

    assert set(load) == {"time", "cpu_percent", "memory_used", "net_rx", "net_tx", "gpus"}
    assert load["time"].endswith("Z")
    assert 0.0 <= load["cpu_percent"] <= 100.0
    assert load["cpu_percent"] == round(load["cpu_percent"], 1)
    assert 0 < load["memory_used"] <= psutil.virtual_memory().total
    assert isinstance(load["net_rx"], int) and load["net_rx"] >= 0
    assert isinstance(load["net_tx"], int) and load["net_tx"] >= 0


def test_history_keeps_only_the_last_window_of_samples():
    sampler = LoadSampler(interval=5, window=20, nvml=Nvml(NoDriverPynvml()))

    samples = [sampler.sample() for _ in range(10)]

    assert sampler.history() == samples[-4:]


def test_the_default_history_covers_five_minutes_at_the_heartbeat_interval():
    sampler = LoadSampler(interval=5, nvml=Nvml(NoDriverPynvml()))

    for _ in range(100):
        sampler.sample()

    assert len(sampler.history()) == 60


def test_node_document_validates_against_the_schema_and_reads_back_as_node_info(node_schema):
    nvml = Nvml(FakePynvml())
    sampler = LoadSampler(interval=5, nvml=nvml)
    load = sampler.sample()
    document = node_document(
        name="node-1", version="0.1.0", executor="process", started="2026-01-01T00:00:00.000Z", tick=12,
        tags=["gpu", "big"], drain=False, capacity=read_capacity(nvml), load=load, history=sampler.history(),
        runs=[{"project": "ulm", "run": "1-detect-1", "stage": "detect", "gpus": (0,),
               "started": "2026-01-01T00:01:00.000Z", "log_tail": "frame 10/100\n", "not_in_schema": 1},
              {"project": "ulm", "run": "1-clean-1", "started": None}],
        heartbeat="2026-01-01T00:02:00.000Z",
    )

    assert_valid(node_schema, document)
    assert document["runs"][0] == {"project": "ulm", "run": "1-detect-1", "stage": "detect", "gpus": [0],
                                   "started": "2026-01-01T00:01:00.000Z", "log_tail": "frame 10/100\n"}
    node = NodeInfo.from_dict(document)
    assert node.gpus == (Gpu(0, "GPU-aaaaaaaa-0000", "NVIDIA RTX A6000", 48 * GiB),
                         Gpu(1, "GPU-bbbbbbbb-1111", "NVIDIA GeForce RTX 3090", 24 * GiB))
    assert (node.tick, node.tags, node.executor) == (12, ("gpu", "big"), "process")
    assert node.running == ("ulm/1-detect-1", "ulm/1-clean-1")


def test_node_document_of_a_node_without_gpus_or_runs_validates(node_schema):
    document = node_document(
        name="node-2", version="0.1.0", executor="docker", started="2026-01-01T00:00:00.000Z", tick=0,
        tags=(), drain=True, capacity=read_capacity(Nvml(NoDriverPynvml())), load=None, history=[], runs=[],
    )

    assert_valid(node_schema, document)
    assert "load" not in document and "heartbeat" not in document
    assert document["capacity"]["gpus"] == []


def test_close_shuts_nvml_down_only_when_it_was_started():
    lib, broken = FakePynvml(), NoDriverPynvml()
    used, unused, failed = Nvml(lib), Nvml(FakePynvml()), Nvml(broken)
    used.devices()
    failed.devices()

    for nvml in (used, unused, failed):
        nvml.close()

    assert (lib.inits, lib.shutdowns) == (1, 1)
    assert broken.shutdowns == 0

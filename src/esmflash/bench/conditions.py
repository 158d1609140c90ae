"""Run conditions of a GPU measurement: SM clock, temperature, power, throttling.

`snapshot()` reads the first visible GPU through NVML (the nvidia-ml-py package, `pynvml`) where
it is importable, else through

    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit,power.draw,
               clocks_throttle_reasons.active --format=csv,noheader,nounits

and says which it used. Anything it cannot read raises RuntimeError: a run-condition record is
never made up.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time

QUERY = ("name", "clocks.sm", "clocks.max.sm", "temperature.gpu", "power.limit", "power.draw",
         "clocks_throttle_reasons.active")
# Clock-event (throttle) reason bits (NVML nvmlClocksEventReason*): GPU idle and the
# applications-clocks setting are not throttling; every other active bit is.
REASON_GPU_IDLE, REASON_APPLICATIONS_CLOCKS = 0x1, 0x2
REASON_NAMES = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
                0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}


def throttled(reasons: int) -> int:
    """1 when any clock-event reason other than GPU idle / applications clocks is active, else 0."""
    return int(bool(reasons & ~(REASON_GPU_IDLE | REASON_APPLICATIONS_CLOCKS)))


def reason_names(reasons: int) -> list[str]:
    return [name for bit, name in REASON_NAMES.items() if reasons & bit] + (
        [f"0x{reasons & ~sum(REASON_NAMES):x}"] if reasons & ~sum(REASON_NAMES) else [])


def gpu_index() -> int:
    """NVML / nvidia-smi index of the first GPU this process sees (CUDA_VISIBLE_DEVICES' first
    entry where it is a number, else 0)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def _record(name, sm, sm_max, temp, limit, draw, reasons: int, source: str) -> dict:
    return {"name": str(name), "sm_clock_mhz": float(sm), "max_sm_clock_mhz": float(sm_max),
            "temperature_c": float(temp), "power_limit_w": float(limit), "power_draw_w": float(draw),
            "throttle_reasons": int(reasons), "throttle_reason_names": reason_names(int(reasons)),
            "throttled": throttled(int(reasons)), "source": source, "time": time.time()}


def _nvml(index: int) -> dict:
    import pynvml as nv

    nv.nvmlInit()
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        name = nv.nvmlDeviceGetName(h)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return _record(name.decode() if isinstance(name, bytes) else name,
                       nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM), nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
                       nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                       nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0, nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                       reasons_fn(h), "nvml")
    finally:
        nv.nvmlShutdown()


def parse_nvidia_smi(line: str) -> dict:
    """One line of the QUERY (csv, noheader, nounits) as a snapshot record."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != len(QUERY):
        raise RuntimeError(f"nvidia-smi: expected {len(QUERY)} fields ({', '.join(QUERY)}), got {line!r}")
    try:
        return _record(fields[0], *(float(f) for f in fields[1:6]), int(fields[6], 16), "nvidia-smi")
    except ValueError:
        raise RuntimeError(f"nvidia-smi: unreadable value in {line!r} (fields {', '.join(QUERY)})") from None


def _nvidia_smi(index: int) -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise RuntimeError("no run conditions: neither pynvml (nvidia-ml-py) nor nvidia-smi is available")
    cmd = [exe, f"--id={index}", f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader,nounits"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return parse_nvidia_smi(proc.stdout.strip().splitlines()[0])


def snapshot() -> dict:
    """The first visible GPU's conditions now: name, sm_clock_mhz, max_sm_clock_mhz,
    temperature_c, power_limit_w (the enforced limit), power_draw_w, throttle_reasons (bit mask),
    throttle_reason_names, throttled (0/1, `throttled`), source ("nvml" or "nvidia-smi"), time."""
    if importlib.util.find_spec("pynvml") is None:  # nvidia-ml-py
        return _nvidia_smi(gpu_index())
    return _nvml(gpu_index())

"""Energy and CO2 of one evaluation, with CodeCarbon, and an honest word on how power was obtained.

CodeCarbon reads real counters where it can (RAPL for CPUs, NVML / AMD SMI for GPUs,
powermetrics on Apple silicon) and otherwise *estimates* power: CPU from its TDP times
its load, or a constant share of the TDP; RAM from the installed memory. The two look
alike in its output, so we read the tracker's hardware objects after the run and label
every component `measured` or `estimated`; tables show that label next to the numbers.
The hardware and software a trial ran on are `mee_bench.provenance`'s business.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

MEASURED_CPU_MODES = {
    "intel_rapl": "RAPL",
    "windows_emi": "Windows EMI (RAPL)",
    "intel_power_gadget": "Intel Power Gadget",
}


def _codecarbon():
    """Import CodeCarbon with its logger quieted (its import resets the level to INFO)."""
    import codecarbon

    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    return codecarbon


@functools.lru_cache(maxsize=1)
def known_countries() -> frozenset[str]:
    """ISO alpha-3 codes CodeCarbon has an energy mix for (an unknown one silently becomes the world average)."""
    _codecarbon()
    from codecarbon.input import DataSource

    return frozenset(DataSource().get_global_energy_mix_data())


def carbon_intensity(country_iso_code: str) -> float:
    """CodeCarbon's grid carbon intensity for a country, g CO2eq per kWh."""
    _codecarbon()
    from codecarbon.input import DataSource

    return float(DataSource().get_global_energy_mix_data()[country_iso_code]["carbon_intensity"])


@dataclass
class CarbonConfig:
    """The sweep config's `carbon` section, kept beside the meter it configures (config imports energy, never back)."""

    country_iso_code: Optional[str] = None  # ISO 3166-1 alpha-3 of where the sweep runs, e.g. FRA
    offline: bool = True  # offline needs country_iso_code; online asks the network where we are
    tracking_mode: str = "process"  # "process": this trial's share; "machine": the whole host
    measure_power_secs: float = 1.0


@dataclass
class PowerComponent:
    """One piece of hardware CodeCarbon tracked and how its power was obtained."""

    kind: str  # cpu, gpu, ram
    source: str  # measured, estimated, unknown
    method: str

    def label(self) -> str:
        return f"{self.kind.upper()} {self.source} ({self.method})"


def describe_hardware(hardware: list[Any]) -> list[PowerComponent]:
    """Classify CodeCarbon's hardware objects (from `tracker._hardware`) by how they obtain power.

    Matches on class names, as CodeCarbon's own hardware cache does, so a reloaded module
    or a new subclass does not break it; anything unrecognised is reported as `unknown`.
    """
    components = []
    for item in hardware:
        name = type(item).__name__
        if name == "CPU":
            mode = getattr(item, "_mode", None)
            tdp = getattr(item, "_tdp", None)
            generic = " generic" if getattr(item, "_is_generic_tdp", False) else ""
            if mode in MEASURED_CPU_MODES:
                components.append(PowerComponent("cpu", "measured", MEASURED_CPU_MODES[mode]))
            elif mode == "cpu_load":
                components.append(PowerComponent("cpu", "estimated", f"TDP x CPU load,{generic} TDP {tdp} W"))
            elif mode == "constant":
                components.append(PowerComponent("cpu", "estimated", f"constant share of{generic} TDP {tdp} W"))
            else:
                components.append(PowerComponent("cpu", "unknown", f"CodeCarbon CPU mode {mode!r}"))
        elif name == "GPU":
            devices = getattr(getattr(item, "devices", None), "devices", [])
            kinds = {"AMD SMI" if "AMD" in type(d).__name__ else "NVML" for d in devices} or {"NVML"}
            components.append(PowerComponent("gpu", "measured", "/".join(sorted(kinds))))
        elif name == "AppleSiliconChip":
            part = str(getattr(item, "chip_part", "chip")).lower()
            components.append(PowerComponent("gpu" if part == "gpu" else "cpu", "measured", "powermetrics"))
        elif name == "Raspberry":
            components.append(PowerComponent("cpu", "measured", "Raspberry Pi PMIC"))
        elif name == "RAM":
            forced = getattr(item, "_force_ram_power", None)
            method = f"user constant {forced} W" if forced is not None else "from installed memory size"
            components.append(PowerComponent("ram", "estimated", method))
        else:
            components.append(PowerComponent(name.lower(), "unknown", "unrecognised CodeCarbon hardware"))
    return components


def power_source(components: list[PowerComponent]) -> str:
    """One word for a table: measured (all components), estimated (none), or partly measured."""
    sources = {c.source for c in components}
    if sources == {"measured"}:
        return "measured"
    if "measured" in sources:
        return "partly measured"
    return "estimated" if sources == {"estimated"} else "unknown"


@dataclass
class EnergyReading:
    """What one evaluation cost: energy, emissions and how power was obtained."""

    energy_kwh: float
    emissions_kg_co2eq: float
    duration_s: float
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    power_source: str
    power_detail: str
    components: list[PowerComponent] = field(default_factory=list)
    country_iso_code: str | None = None
    tracking_mode: str = "process"
    cpu_model: str | None = None
    gpu_model: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class Measurement:
    """Filled in when the `EnergyMeter.measure()` block ends."""

    reading: EnergyReading | None = None


class EnergyMeter:
    """Wraps evaluations in a CodeCarbon tracker configured from the sweep's `carbon` section."""

    def __init__(self, carbon: CarbonConfig, gpu_ids: list[int] | None = None, project_name: str = "mee-bench") -> None:
        self.carbon = carbon
        self.gpu_ids = gpu_ids  # a Ray worker's own GPUs, so concurrent trials do not count each other's
        self.project_name = project_name

    def _tracker(self):
        codecarbon = _codecarbon()
        options = dict(
            project_name=self.project_name,
            output_methods=[],
            log_level="error",
            measure_power_secs=self.carbon.measure_power_secs,
            tracking_mode=self.carbon.tracking_mode,
            allow_multiple_runs=True,
        )
        if self.gpu_ids:
            options["gpu_ids"] = self.gpu_ids
        if self.carbon.offline:
            return codecarbon.OfflineEmissionsTracker(country_iso_code=self.carbon.country_iso_code, **options)
        return codecarbon.EmissionsTracker(**options)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Track the block; the tracker is stopped (and the reading taken) even if the block raises."""
        measurement = Measurement()
        tracker = self._tracker()
        tracker.start()
        try:
            yield measurement
        finally:
            tracker.stop()
            measurement.reading = self._reading(tracker)

    def _reading(self, tracker) -> EnergyReading:
        data = tracker.final_emissions_data
        components = describe_hardware(list(getattr(tracker, "_hardware", [])))
        return EnergyReading(
            energy_kwh=float(data.energy_consumed),
            emissions_kg_co2eq=float(data.emissions),
            duration_s=float(data.duration),
            cpu_energy_kwh=float(data.cpu_energy),
            gpu_energy_kwh=float(data.gpu_energy),
            ram_energy_kwh=float(data.ram_energy),
            power_source=power_source(components),
            power_detail="; ".join(c.label() for c in components),
            components=components,
            country_iso_code=data.country_iso_code or self.carbon.country_iso_code,
            tracking_mode=self.carbon.tracking_mode,
            cpu_model=data.cpu_model or None,
            gpu_model=data.gpu_model or None,
        )

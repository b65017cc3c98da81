"""CodeCarbon around an evaluation: energy, the country's grid, and how power was obtained."""

from __future__ import annotations

import pytest
from codecarbon.external.hardware import CPU, GPU
from codecarbon.external.ram import RAM

from mee_bench.sweep.config import CarbonConfig
from mee_bench.sweep.energy import (
    EnergyMeter,
    PowerComponent,
    carbon_intensity,
    describe_hardware,
    known_countries,
    power_source,
)


def busy_work() -> int:
    return sum(i * i for i in range(400_000))


def cpu_in_mode(mode: str, tdp: float = 65.0, generic: bool = False) -> CPU:
    """A real CodeCarbon CPU object in a given mode, without touching /sys (RAPL need not exist here)."""
    cpu = CPU.__new__(CPU)
    cpu._mode, cpu._tdp, cpu._is_generic_tdp = mode, tdp, generic
    return cpu


def test_rapl_and_nvml_are_measured_tdp_and_ram_are_estimated():
    gpu = GPU.__new__(GPU)
    components = describe_hardware([cpu_in_mode("intel_rapl"), gpu, RAM(tracking_mode="machine")])
    assert [(c.kind, c.source) for c in components] == [("cpu", "measured"), ("gpu", "measured"), ("ram", "estimated")]
    assert components[0].method == "RAPL" and components[1].method == "NVML"
    assert power_source(components) == "partly measured"
    load = describe_hardware([cpu_in_mode("cpu_load", 85, generic=True)])[0]
    assert (load.source, load.method) == ("estimated", "TDP x CPU load, generic TDP 85 W")
    constant = describe_hardware([cpu_in_mode("constant", 85)])[0]
    assert constant.source == "estimated" and "constant share" in constant.method


def test_power_source_summary():
    measured, estimated = PowerComponent("cpu", "measured", "RAPL"), PowerComponent("ram", "estimated", "size")
    assert power_source([measured]) == "measured"
    assert power_source([estimated]) == "estimated"
    assert power_source([measured, estimated]) == "partly measured"
    assert power_source([PowerComponent("x", "unknown", "?")]) == "unknown"


@pytest.mark.parametrize("country", ["FRA", "POL"])
def test_emissions_follow_the_configured_country_grid(country):
    meter = EnergyMeter(CarbonConfig(country_iso_code=country, measure_power_secs=1))
    with meter.measure() as measurement:
        busy_work()
    reading = measurement.reading
    assert reading.energy_kwh > 0 and reading.duration_s > 0
    assert reading.energy_kwh == pytest.approx(reading.cpu_energy_kwh + reading.gpu_energy_kwh + reading.ram_energy_kwh)
    grams_per_kwh = 1e3 * reading.emissions_kg_co2eq / reading.energy_kwh
    assert grams_per_kwh == pytest.approx(carbon_intensity(country), rel=1e-6)
    assert reading.country_iso_code == country
    assert reading.power_source in {"measured", "partly measured", "estimated"}
    assert {c.kind for c in reading.components} >= {"cpu", "ram"}
    record = reading.as_dict()
    assert record["power_detail"] and record["components"][0]["source"] in {"measured", "estimated"}


def test_tracker_is_stopped_and_read_when_the_evaluation_raises():
    meter = EnergyMeter(CarbonConfig(country_iso_code="FRA"))
    with pytest.raises(RuntimeError, match="boom"):
        with meter.measure() as measurement:
            busy_work()
            raise RuntimeError("boom")
    assert measurement.reading is not None and measurement.reading.energy_kwh > 0


def test_codecarbon_stays_quiet(capfd):
    with EnergyMeter(CarbonConfig(country_iso_code="FRA")).measure():
        busy_work()
    captured = capfd.readouterr()
    assert "codecarbon" not in (captured.out + captured.err).lower()


def test_known_countries_are_codecarbon_iso_codes():
    countries = known_countries()
    assert {"FRA", "USA", "DEU"} <= countries and "FRX" not in countries

"""The packaged chip catalog: figures, sources, uncertainty flags, user overrides, device kinds."""
import pytest

from polychip.hardware import HardwareError, chip_for_device_kind, get_chip, load_catalog

EXPECTED = {"tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "tpu7x", "trn1", "trn2", "trn3", "inf2",
            "h100", "h100-hbm2e", "h200", "b200", "gb200"}  # h100-hbm2e: torchtitan's Grand Teton part


def test_every_reference_chip_is_present_with_sources():
    cat = load_catalog()
    assert set(cat) == EXPECTED
    for chip in cat.values():
        assert chip.sources, chip.name
        assert chip.peak("bfloat16") and chip.peak("bfloat16") > 1e13, chip.name
        assert chip.hbm_bytes > 1e9 and chip.hbm_bandwidth > 1e11, chip.name


def test_figures_match_reference_units():
    # Spot checks against /work/shared/reference/accelerators.md, converted to SI.
    v6e = get_chip("tpu-v6e")
    assert v6e.peak("bf16") == pytest.approx(918e12)
    assert v6e.hbm_bytes == pytest.approx(32e9)
    assert v6e.hbm_bandwidth == pytest.approx(1.638e12)
    assert v6e.link_bandwidth == pytest.approx(800e9)
    assert v6e.price_per_hour == pytest.approx(2.70) and v6e.price_date == "2024-12"
    x7 = get_chip("tpu7x")
    assert x7.hbm_bytes == pytest.approx(192 * 2**30)  # GiB in the source
    assert x7.peak("fp8") == pytest.approx(4614e12)
    h100 = get_chip("h100")
    assert h100.power_w == 700 and h100.peak("float8") == pytest.approx(1979e12)
    assert get_chip("tpu-v5e").peak("int8") == pytest.approx(393e12)
    assert get_chip("tpu-v5e").peak("float8") is None  # "-" in the reference: no figure, no fallback


def test_uncertain_flags_follow_the_reference():
    cat = load_catalog()
    for name in ("tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "tpu7x"):
        assert cat[name].power_w is None and cat[name].is_uncertain("power_w"), name
    assert cat["tpu7x"].is_uncertain("price_per_hour") and cat["tpu7x"].price_per_hour == 12.0
    assert cat["trn3"].is_uncertain("power_w") and cat["trn3"].power_w == 1000
    assert cat["trn1"].is_uncertain("link_bandwidth")
    assert cat["trn2"].price_per_hour is None and cat["trn2"].is_uncertain("price_per_hour")
    assert cat["gb200"].is_uncertain("peak") and cat["gb200"].price_per_hour is None
    assert cat["b200"].is_uncertain("hbm")
    assert cat["tpu-v4"].link_bandwidth is None and cat["tpu-v4"].is_uncertain("link_bandwidth")
    # Every null figure is explained.
    for chip in cat.values():
        for f in ("power_w", "price_per_hour", "link_bandwidth"):
            if getattr(chip, f) is None:
                assert chip.is_uncertain(f) and chip.uncertain_why[f], (chip.name, f)
    # Firm published figures are not flagged.
    assert not cat["h100"].is_uncertain("power_w") and not cat["tpu-v6e"].is_uncertain("price_per_hour")


def test_float32_peak_falls_back_to_bf16_and_says_so():
    h100 = get_chip("h100")
    assert h100.peak("float32") == h100.peak("bfloat16")
    assert "bfloat16 peak used" in h100.peak_basis("float32")
    with pytest.raises(HardwareError, match="unknown dtype"):
        h100.peak("float64")


def test_get_chip_aliases_and_error_lists_names():
    assert get_chip("V5E").name == "tpu-v5e"
    assert get_chip("ironwood").name == "tpu7x"
    assert get_chip("Trainium2").name == "trn2"
    with pytest.raises(HardwareError) as e:
        get_chip("tpu-v9")
    assert "tpu-v9" in str(e.value) and "h100" in str(e.value) and "tpu7x" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_device_kind_lookup():
    assert chip_for_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert chip_for_device_kind("TPU v5 lite").name == "tpu-v5e"
    assert chip_for_device_kind("Some Future Chip") is None


def test_tpu7x_has_two_devices_per_chip():
    x7 = get_chip("tpu7x")
    assert x7.devices_per_chip == 2 and x7.device_peak("bf16") == pytest.approx(2307e12 / 2)


def test_user_override_merges(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text(
        "chips:\n"
        "  h100:\n"
        "    price_per_hour: 2.5\n"
        "    price_date: '2026-09'\n"
        "  tpu-v5e:\n"
        "    power_w: 250\n"
        "  mychip:\n"
        "    vendor: acme\n"
        "    family: gpu\n"
        "    peak: {bfloat16: 100}\n"
        "    hbm: 24 GiB\n"
        "    hbm_bandwidth: 1.0\n"
        "    chips_per_host: 4\n"
        "    sources: [acme datasheet]\n"
    )
    cat = load_catalog(f)
    assert cat["h100"].price_per_hour == 2.5 and cat["h100"].price_date == "2026-09"
    assert cat["h100"].peak("bf16") == pytest.approx(989e12)  # untouched fields kept
    assert cat["tpu-v5e"].power_w == 250 and not cat["tpu-v5e"].is_uncertain("power_w")
    assert any("user catalog" in s for s in cat["tpu-v5e"].sources)
    assert cat["mychip"].hbm_bytes == 24 * 2**30 and cat["mychip"].price_per_hour is None
    # The built-in catalog is untouched by the override.
    assert load_catalog()["h100"].price_per_hour == 6.88


@pytest.mark.parametrize(
    "body, field, line",
    [
        ("chips:\n  h100:\n    price_per_hour: cheap\n", "chips.h100.price_per_hour", 3),
        ("chips:\n  h100:\n    peak: {bfloat16: -5}\n", "chips.h100.peak.bfloat16", 3),
        ("chips:\n  h100:\n    colour: green\n", "chips.h100.colour", 3),
        ("chips:\n  new:\n    vendor: x\n", "chips.new", 2),
        ("chips:\n  h100:\n    hbm: lots\n", "chips.h100.hbm", 3),
        ("chips:\n  h100:\n    price_per_hour: [1\n", None, None),
    ],
)
def test_bad_override_names_the_field(tmp_path, body, field, line):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(HardwareError) as e:
        load_catalog(f)
    msg = str(e.value)
    assert str(f) in msg
    if field:
        assert f"field {field}" in msg and f"line {line}" in msg
    else:
        assert "not valid YAML" in msg


def test_missing_override_file(tmp_path):
    with pytest.raises(HardwareError, match="not found"):
        load_catalog(tmp_path / "nope.yaml")

"""Options by signature: every flag reaches every selected method that takes it, and is refused otherwise."""
import pytest

from vargen.cli import build_parser, main
from vargen.decoding.options import check_compile, method_options, route_options
from vargen.errors import UsageError


def _bench(argv):
    from vargen.cli.args import bench_methods

    return bench_methods(build_parser().parse_args(["bench", "speed", *argv]))


def test_window_reaches_every_selected_method_that_has_a_window():
    methods, options = _bench(["--methods", "sjd,gsd,jacobi,zipar,ar", "--window", "4"])
    assert {m: o.get("window") for m, o in options.items()} == {
        "sjd": 4, "gsd": 4, "jacobi": 4, "zipar": 4, "ar": None}


def test_family_flags_stay_with_their_family():
    _, options = _bench(["--methods", "sjd,zipar,zipar-adaptive", "--window", "16", "--zipar-window", "8"])
    assert options["zipar"]["window"] == options["zipar-adaptive"]["window"] == 8 and options["sjd"]["window"] == 16
    _, options = _bench(["--methods", "eagle,eagle+lantern,sjd+lantern", "--eagle-depth", "3", "--lantern-delta", "0.2"])
    assert options["eagle"] == {"depth": 3} and options["eagle+lantern"] == {"depth": 3, "lantern_delta": 0.2}
    assert options["sjd+lantern"] == {"lantern_delta": 0.2}


def test_a_flag_no_selected_method_takes_is_refused_with_the_methods_that_would():
    with pytest.raises(UsageError, match="--window is not taken by ar, lpd; it is for .*sjd"):
        route_options(["ar", "lpd"], {"window": 4})
    with pytest.raises(UsageError, match="--init is not taken by gsd"):  # gsd fixes its own random init
        route_options(["gsd"], {"init": "left"})
    with pytest.raises(UsageError, match="--lantern-delta"):
        route_options(["sjd"], {"lantern_delta": 0.3})


def test_pac_knobs_reach_only_the_pac_methods(capsys):
    _, options = _bench(["--methods", "sjd+coupling,sjd+coupling+pac", "--pac-width", "8", "--pac-chain", "7"])
    assert options["sjd+coupling+pac"] == {"pac_width": 8, "pac_chain": 7} and options["sjd+coupling"] == {}
    with pytest.raises(UsageError, match="--pac-chain is not taken by sjd"):
        route_options(["sjd"], {"pac_chain": 3})
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "speed", "--model", "tiny-random", "--methods", "sjd+pac", "--pac-chain", "-1"])
    assert exit_.value.code == 2 and "--pac-chain: must be >= 0" in capsys.readouterr().err


def test_fixed_options_of_a_registry_entry_cannot_be_overridden():
    assert "init" in method_options("sjd") and "init" not in method_options("gsd")
    assert "coupling" not in method_options("sjd+coupling")
    from vargen.decoding.methods import get_method

    with pytest.raises(UsageError, match="takes no option"):
        get_method("sjd+coupling", coupling="none")  # would run plain sjd under the coupling name


def test_compile_is_refused_where_it_would_not_reach_the_steps(capsys):
    check_compile(["ar", "sjd", "zipar", "lpd", "nar"], "reduce-overhead")
    with pytest.raises(UsageError, match="; eagle decode with a drafter"):
        check_compile(["sjd", "lpd", "eagle"], "reduce-overhead")
    assert main(["bench", "speed", "--model", "tiny-random", "--methods", "ar,eagle", "--compile"]) == 2
    assert "eagle decode with a drafter of their own" in capsys.readouterr().err


def test_latency_table_flags_without_sizes_are_refused(capsys):
    assert main(["bench", "speed", "--model", "tiny-random", "--methods", "ar", "--tokens", "64"]) == 2
    assert "--tokens belong to the latency table: give --sizes" in capsys.readouterr().err

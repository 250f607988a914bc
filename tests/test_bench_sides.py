"""The side-by-side benchmarks' side names (benchmarks/peers.py): what each
side runs with, and the short errors for a wrong name or a missing peer."""

import pytest

from benchmarks import peers

BASE = {"remat": "none", "iterations": 1}


def test_ours_remat_recomputes_layers_and_ours_keeps_the_setting():
  assert peers.side_settings("ours", BASE)["remat"] == "none"
  assert peers.side_settings("ours_remat", BASE)["remat"] == "full"
  assert BASE["remat"] == "none"  # the shared settings are not changed


@pytest.mark.parametrize("side, accumulate, checkpointing", [
    ("trl_onebatch", False, True), ("trl_accum", True, True),
    ("trl_onebatch_nockpt", False, False), ("trl_accum_nockpt", True, False)])
def test_trl_sides_say_accumulation_and_gradient_checkpointing(
    side, accumulate, checkpointing):
  s = peers.side_settings(side, BASE)
  assert s["trl_accumulate"] is accumulate
  assert s["trl_grad_checkpointing"] is checkpointing
  assert "trl_accumulate" not in peers.side_settings("ours", BASE)


def test_an_unknown_side_is_refused_with_the_known_names():
  with pytest.raises(SystemExit, match="unknown side 'trl'.*trl_accum_nockpt"):
    peers.side_settings("trl", BASE)


def test_no_side_ran_is_a_one_line_exit_not_a_traceback():
  with pytest.raises(SystemExit, match="every side failed"):
    peers.succeeded({"ours": {"failed": 1}, "trl_accum": {"failed": -9}})
  ok = {"ours": {"median": {}}}
  assert peers.succeeded({**ok, "trl_accum": {"failed": 1}}) == ok


def test_a_side_without_its_peer_library_exits_with_the_install_command(
    tmp_path, monkeypatch):
  def run_side(side, settings):
    raise ModuleNotFoundError("No module named 'trl'", name="trl")
  argv = ["--child", "trl_accum", "--settings", '{"remat": "none"}',
          "--result", str(tmp_path / "r.json")]
  with pytest.raises(SystemExit, match="needs 'trl'.*requirements-bench.txt"):
    peers.child_main(run_side, argv)


def test_child_main_passes_other_benchmarks_sides_through(tmp_path):
  # benchmarks/scan_layers.py runs sides "unrolled" and "scan" through the
  # same child entry point: the side names above must not be imposed there.
  seen = {}

  def run_side(side, settings):
    seen.update(side=side, settings=settings)
    return {"ok": 1}
  result = tmp_path / "r.json"
  peers.child_main(run_side, ["--child", "unrolled", "--settings",
                              '{"remat": "none"}', "--result", str(result)])
  assert seen == {"side": "unrolled", "settings": {"remat": "none"}}
  assert result.exists()

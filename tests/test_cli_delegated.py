"""`chatrex convert|train|eval` hand their arguments to the module's own `main`."""

from __future__ import annotations

from chatrex.cli import DELEGATED, build_parser, main


def test_delegated_commands_are_listed_in_help(capsys):
    help_text = build_parser().format_help()
    for name in DELEGATED:
        assert name in help_text


def test_convert_missing_folder_is_one_line_error(tmp_path, capsys):
    code = main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "chatrex convert: error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_train_without_choice_prints_usage(capsys):
    assert main(["train"]) == 2
    assert "upn|chatrex" in capsys.readouterr().err


def test_data_command_writes_a_coco_set_pycocotools_loads(tmp_path, capsys):
    from pycocotools.coco import COCO

    assert main(["data", "--out", str(tmp_path / "set"), "-n", "3", "--renderer", "alt"]) == 0
    coco = COCO(str(tmp_path / "set" / "annotations.json"))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) >= 3
    assert len(list((tmp_path / "set" / "images").glob("*.png"))) == 3

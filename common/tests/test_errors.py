"""cli_guard: a UserError is one line on stderr and exit code 2, also when a DataLoader worker raised it."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, Dataset

from common.data import DatasetError
from common.errors import UserError, cli_guard


class _BadItem(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        raise DatasetError(f"label item_{index}.png holds value 200, outside the 11 classes of camvid")


@pytest.mark.parametrize("workers", [0, 1])
def test_error_is_one_line_even_from_a_dataloader_worker(workers: int, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSVAI_TRACEBACK", raising=False)

    @cli_guard
    def main() -> None:
        for _ in DataLoader(_BadItem(), batch_size=1, num_workers=workers):
            pass

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: label item_0.png holds value 200, outside the 11 classes of camvid\n"


def test_a_plain_user_error_is_printed_as_is(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSVAI_TRACEBACK", raising=False)

    @cli_guard
    def main() -> None:
        raise UserError("config data.root is not set: pass data.root=<root>")

    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().err == "error: config data.root is not set: pass data.root=<root>\n"

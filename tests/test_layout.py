"""The test tree itself: pytest imports test files by basename (there are no packages), so two files with
one name anywhere under tests/ stop the whole run at collection."""

from collections import Counter
from pathlib import Path


def test_test_file_names_are_unique():
    names = Counter(path.name for path in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []

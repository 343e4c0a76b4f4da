"""The documentation holds together: every relative link in README.md and docs/ names a file
that exists (and a heading there, when it names one), and the README stays a short front door."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_LIMIT = 12 * 1024


def prose(page: Path) -> str:
    return re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code holds no links


def relative_links(page: Path):
    """(file, anchor) of each link to this repository's files; file is the page itself for '#...'."""
    for target in LINK.findall(prose(page)):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):
            path, _, anchor = target.partition("#")
            yield (page.parent / path if path else page), anchor


def anchors(page: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", prose(page), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_points_to_an_existing_file_and_heading():
    assert (ROOT / "docs" / "README.md").exists()
    broken = [f"{page.relative_to(ROOT)}: {target.name}#{anchor}" for page in PAGES
              for target, anchor in relative_links(page)
              if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target))]
    assert not broken, broken


def test_the_links_are_checked_at_all():
    assert sum(1 for page in PAGES for _ in relative_links(page)) >= len(PAGES)


def test_readme_is_a_short_front_door():
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT, f"README.md is {size:,} bytes; move detail into docs/"


def test_readme_commands_are_the_ones_ci_and_the_demo_benchmark_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = re.search(r"## Run the tests \(one command\)\n+```bash\n(.+?)\n```", readme).group(1)
    assert test_command in ci.splitlines()
    set_up = re.search(r"## Set up \(two commands\)\n+```bash\n(.+?)\n```", readme, re.S).group(1)
    assert all(line in ci.splitlines() for line in set_up.splitlines())
    # benchmarks/bench_demo.py runs the first bash block under this heading
    assert re.search(r"## Run the whole pipeline \(one command\)\n+```bash\npython llm_model.py ", readme)

"""The console in a real browser (Debian's Chromium driven by Playwright,
:mod:`tests.fixtures.browser`) against the real admin app over real HTTP and real Postgres
rows (:mod:`tests.fixtures.console`): a wrong token is refused, the canary chart has one
point per controller decision, a promotion with a reason changes the registry and the audit
log under the name of the token that signed in, the training curves and side-by-side
answers are drawn. Every page's screenshot is
written (``ALIGNLOOP_SCREENSHOT_DIR``, default the test's temporary directory).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.console.app import create_app
from deploy.local.broker import free_port
from deploy.ops.admin_api import serve_in_thread
from deploy.ops.admin_auth import AdminTokens, add_token
from deploy.policies import registry
from feedback.db import connect
from tests.fixtures.browser import TOKEN_KEY, browser_page, screenshot, screenshot_dir
from tests.fixtures.browser import login as _login
from tests.fixtures.console import Seeded, seed

TOKEN = "browser-test-token-0123456789abcdef"  # ALIGNLOOP_ADMIN_TOKEN: the operator `admin`
ALICE = "alice-browser-token-0123456789abcdef"  # a named token: the operator `alice`


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    return screenshot_dir(tmp_path / "screenshots")


@pytest.fixture
def console(migrated_url: str, tmp_path: Path) -> Iterator[tuple[str, Seeded]]:
    seeded = seed(migrated_url)
    port = free_port()
    add_token(tmp_path / "admin_tokens.jsonl", "alice", ALICE)
    tokens = AdminTokens(TOKEN, tmp_path / "admin_tokens.jsonl")
    server, thread = serve_in_thread(create_app(migrated_url, tokens), "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}", seeded
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def page(console: tuple[str, Seeded]):
    with browser_page() as page:
        yield page


_shot = screenshot


def test_wrong_token_is_refused(page, console, screenshots: Path) -> None:
    base, _ = console
    _login(page, base, "not-the-token")
    page.wait_for_selector("#login-error:has-text('Invalid admin token')")
    assert page.is_hidden("#page") and page.is_visible("#login")
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None
    assert "not-the-token" not in page.url
    _shot(page, screenshots, "login-refused")


def test_canary_chart_has_one_point_per_decision(page, console, screenshots: Path) -> None:
    base, seeded = console
    _login(page, base, TOKEN)
    page.wait_for_selector("#page[data-page=policies]")
    assert page.inner_text("#who") == "signed in as admin"
    page.click("#nav a[data-page=canary]")
    page.wait_for_selector("#canary-chart[data-drawn=true]")
    # Plotly keeps the drawn traces on the element: the estimate's trace has the points.
    counts = page.evaluate("document.getElementById('canary-chart').data.map(t => t.x.length)")
    assert counts[:3] == [seeded.ticks] * 3  # upper, lower (the band), estimate
    assert page.inner_text("#canary-head").count("promote") >= 1
    assert page.locator("#canary-stages[data-drawn=true]").count() == 1
    _shot(page, screenshots, "canary")


def test_promote_with_a_reason_changes_registry_and_audit(
    page, console, migrated_url: str, screenshots: Path
) -> None:
    base, seeded = console
    _login(page, base, ALICE)
    page.wait_for_selector(f"tr[data-version='{seeded.waiting}']")
    assert page.inner_text("#who") == "signed in as alice"  # the token's name
    _shot(page, screenshots, "policies")
    page.click(f"tr[data-version='{seeded.waiting}'] button[data-action=promote]")
    page.click("#action-confirm")  # no reason: refused in the page, nothing sent
    assert page.inner_text("#action-error").startswith("A reason is required")
    page.fill("#action-reason", "offline win rate 0.72, reviewed the side-by-side answers")
    page.click("#action-confirm")
    page.wait_for_selector("#audit-written")
    notice = page.inner_text("#audit-written")
    assert f"promote {seeded.waiting} candidate → stable by alice" in notice
    with connect(migrated_url, autocommit=True) as conn:
        assert registry.get(conn, seeded.waiting).state == "stable"
        last = registry.audit_log(conn, seeded.waiting, limit=1)[-1]
    assert (last.actor, last.action, last.to_state) == ("alice", "promote", "stable")
    assert last.reason == "offline win rate 0.72, reviewed the side-by-side answers"
    row = page.locator(f"tr[data-version='{seeded.waiting}']")
    assert "stable" in row.inner_text()

    # A refused command shows the API's message in the dialog.
    page.click(f"tr[data-version='{seeded.canary}'] button[data-action=promote]")
    page.fill("#action-reason", "back to v1")
    with connect(migrated_url, autocommit=True) as conn:  # meanwhile, someone else did it
        registry.promote(conn, seeded.canary, actor="bob", reason="faster")
    page.click("#action-confirm")
    page.wait_for_selector("#action-error:not(:empty)")
    message = page.inner_text("#action-error")
    with connect(migrated_url, autocommit=True) as conn:
        last = registry.audit_log(conn, seeded.canary, limit=1)[-1]
    assert seeded.canary in message and last.actor == "bob"


def test_training_curves_and_side_by_side(page, console, screenshots: Path) -> None:
    base, seeded = console
    _login(page, base, ALICE)
    page.wait_for_selector("#page[data-page=policies]")
    page.click("#nav a[data-page=training]")
    page.wait_for_selector("#curve-length[data-drawn=true]")
    assert page.get_attribute("#training-curves", "data-iterations") == str(seeded.iterations)
    for chart in ("curve-reward", "curve-kl", "curve-clip", "curve-length"):
        xs = page.evaluate(f"document.getElementById('{chart}').data.map(t => t.x.length)")
        assert xs == [seeded.iterations, seeded.iterations], chart
    assert page.locator("text=Put the egg in boiling water").count() == 3
    page.fill("#round-reason", "new prompts from support")
    page.click("#round-form button[type=submit]")
    page.wait_for_selector("#round-request")
    assert "by alice waits for the training loop" in page.inner_text("#round-request")
    _shot(page, screenshots, "training")
    page.click("#nav a[data-page=traffic]")
    page.wait_for_selector("#traffic-answers[data-drawn=true]")
    _shot(page, screenshots, "traffic")

"""The dashboard's pages as HTML strings.

Every value that comes from a request or the database (a user id, a tip id, a policy
name, a saved report's text) passes `escape` before it is written; the page carries no
script, and its Content-Security-Policy (routes.py) would refuse one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from urllib.parse import quote

from oo_serving import __version__
from oo_serving.api.dashboard import svg
from oo_serving.api.dashboard.data import (
    WINDOWS,
    Z95,
    CandidateView,
    DecisionView,
    Overview,
    PolicyView,
    Tally,
    Trend,
    UserView,
    Window,
)
from oo_serving.api.dashboard.evaluation import LOGGING, EvaluationView, IntervalRow

STYLESHEET = "/dashboard/static/dashboard.css"


# ── formatting ───────────────────────────────────────────────────────────────


def when(ts_ms: int | None) -> str:
    """A time in UTC, to the second."""
    if ts_ms is None:
        return "never"
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_text(ts: str | None) -> str:
    """An ISO-8601 time from a saved report, as `when` writes times; '?' if absent."""
    if ts is None:
        return "?"
    try:
        moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return ts
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def count(n: int) -> str:
    return f"{n:,}"


def user_path(root: str, user_id: str) -> str:
    return f"{root}/dashboard/users/{quote(user_id, safe='')}"


# ── the page around the content ──────────────────────────────────────────────


def document(title: str, content: str, *, root: str, window: Window | None = None) -> str:
    """A whole page: head, the top bar (windows when `window` is given, the user form),
    the content."""
    nav = ""
    if window is not None:
        current = ' class="current" aria-current="page"'
        links = "".join(
            f'<a href="{escape(root)}/dashboard?window={escape(w.name)}"'
            f"{current if w.name == window.name else ''}>{escape(w.name)}</a>"
            for w in WINDOWS.values()
        )
        nav = f'<nav class="windows" aria-label="time window">{links}</nav>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · oO ML Serving</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{escape(root)}{STYLESHEET}?v={escape(__version__)}">
</head>
<body>
<header class="top"><div class="bar">
<h1><a href="{escape(root)}/dashboard">oO ML Serving · dashboard</a></h1>
{nav}
<form class="lookup" method="get" action="{escape(root)}/dashboard/users">
<input type="text" name="user_id" placeholder="user id" aria-label="user id" required>
<button type="submit">Open user</button>
</form>
</div></header>
<main>
{content}
</main>
</body>
</html>
"""


def error_page(title: str, message: str, *, root: str) -> str:
    content = (
        f'<div class="error-page"><h2>{escape(title)}</h2><p>{escape(message)}</p>'
        f'<p><a href="{escape(root)}/dashboard">Back to the dashboard</a></p></div>'
    )
    return document(title, content, root=root)


def legend(policies: Sequence[PolicyView], extra: str = "") -> str:
    items = "".join(f"<span>{svg.swatch(p.colour)}{escape(p.name)}</span>" for p in policies)
    return f'<div class="legend">{items}{extra}</div>'


# ── the overview ─────────────────────────────────────────────────────────────


def overview_page(o: Overview, *, root: str) -> str:
    parts = [_meta(o)]
    if not o.policies:
        parts.append('<div class="empty">No policy is configured.</div>')
    parts.append('<section class="cards">')
    parts += [_card(p) for p in o.policies]
    parts.append("</section>")
    parts.append("<h2>Over time</h2>")
    parts.append(_charts(o))
    parts.append("<h2>Per policy</h2>")
    parts.append(_policy_table(o))
    parts.append("<h2>Policy split</h2>")
    parts.append(_split(o))
    parts.append("<h2>Latest offline evaluation</h2>")
    parts.append(_evaluation(o))
    parts.append("<h2>Settings</h2>")
    parts.append(_settings(o))
    parts.append(_footer())
    return document("Dashboard", "\n".join(parts), root=root, window=o.window)


def _meta(o: Overview) -> str:
    total = o.total
    return (
        f'<p class="meta">Decisions logged from {escape(when(o.since_ms))} to'
        f" {escape(when(o.until_ms))}, in {escape(o.window.label)} buckets:"
        f' <b id="total-decisions">{count(total.decisions)}</b> decisions,'
        f" {count(total.rewarded)} rewarded, {count(o.users)} users."
        f" Read at {escape(when(o.now_ms))}.</p>"
    )


def _card(p: PolicyView) -> str:
    t = p.total
    served = (
        f"serves {pct(p.configured_share)} of users"
        if p.configured_share is not None
        else "not serving now"
    )
    se = t.reward_se
    spread = f"± {num(Z95 * se)}" if se is not None else ""
    return f"""<div class="card" data-policy="{escape(p.name)}">
<div class="name">{svg.swatch(p.colour)}{escape(p.name)}<span class="served">{escape(served)}</span></div>
<div class="big"><span data-field="reward_rate">{num(t.reward_rate)}</span> <small>{spread} reward rate</small></div>
{_trend(p.trend)}
<dl>
<dt>decisions</dt><dd data-field="decisions">{count(t.decisions)}</dd>
<dt>rewarded</dt><dd data-field="rewarded">{count(t.rewarded)}{_defaulted(t)}</dd>
<dt>join rate</dt><dd data-field="join_rate">{pct(t.join_rate)}</dd>
<dt>exploration share</dt><dd data-field="exploration_share">{pct(t.exploration_share)}</dd>
<dt>users</dt><dd data-field="users">{count(p.users)}</dd>
</dl>
</div>"""


def _defaulted(t: Tally) -> str:
    return f" ({count(t.defaulted)} by default)" if t.defaulted else ""


def _trend(trend: Trend) -> str:
    direction = trend.direction
    before, after = trend.before.reward_rate, trend.after.reward_rate
    if direction == "unknown":
        text = (
            f"trend: too few rewards to tell (needs {trend.MIN_REWARDS} in each half of the"
            f" window; has {trend.before.rewarded} and {trend.after.rewarded})"
        )
    else:
        change, se = trend.change or 0.0, trend.change_se or 0.0
        moved = f"{num(before)} → {num(after)} ({change:+.3f} ± {Z95 * se:.3f})"
        label = {"up": "▲ rising", "down": "▼ falling", "steady": "no clear change"}[direction]
        text = f"{label}: {moved}, first half of the window → second half"
    return f'<p class="trend {direction}" data-field="trend">{escape(text)}</p>'


def _charts(o: Overview) -> str:
    axis = svg.TimeAxis(o.since_ms, o.window.bucket_ms, o.window.buckets)
    ps = o.policies
    reward = svg.line_chart(
        [
            svg.Series(
                p.name,
                p.colour,
                [b.reward_rate for b in p.buckets],
                band=[b.reward_band for b in p.buckets],
                notes=[f"{count(b.rewarded)} rewards" for b in p.buckets],
            )
            for p in ps
        ],
        axis,
        label="reward rate per policy over time, with ±1.96 standard errors",
        y_format=lambda v: f"{v:.2f}",
    )
    join = svg.line_chart(
        [
            svg.Series(
                p.name,
                p.colour,
                [b.join_rate for b in p.buckets],
                notes=[f"{count(b.client_rewarded)} of {count(b.decisions)}" for b in p.buckets],
            )
            for p in ps
        ],
        axis,
        label="join rate per policy over time",
        y_format=lambda v: f"{100 * v:.0f}%",
        y_floor=0.0,
        y_ceiling=1.0,
        include_zero=True,
    )
    volume = svg.line_chart(
        [
            series
            for p in ps
            for series in (
                svg.Series(f"{p.name} decisions", p.colour, [b.decisions for b in p.buckets]),
                svg.Series(
                    f"{p.name} rewarded", p.colour, [b.rewarded for b in p.buckets], dashed=True
                ),
            )
        ],
        axis,
        label="decisions and rewarded decisions per policy over time",
        y_format=lambda v: f"{v:,.0f}",
        y_floor=0.0,
        include_zero=True,
    )
    exploration = svg.line_chart(
        [
            svg.Series(
                p.name,
                p.colour,
                [b.exploration_share for b in p.buckets],
                notes=[f"{count(b.explored)} of {count(b.decisions)}" for b in p.buckets],
            )
            for p in ps
        ],
        axis,
        label="exploration share per policy over time",
        y_format=lambda v: f"{100 * v:.0f}%",
        y_floor=0.0,
        y_ceiling=1.0,
        include_zero=True,
    )
    dashed = (
        f"<span>{svg.swatch(6)}decisions</span><span>{svg.swatch(6, dashed=True)}rewarded</span>"
    )
    figures = [
        (
            "reward-rate",
            "Reward rate",
            reward,
            "",
            "Mean kept reward of the rewarded decisions, per bucket; the band is ±1.96"
            " standard errors. A bucket shows once it has a reward.",
        ),
        (
            "join-rate",
            "Join rate",
            join,
            "",
            "Share of the bucket's decisions the client sent a reward for. The latest"
            " buckets rise while their rewards arrive (within OO_REWARD_WAIT).",
        ),
        (
            "volume",
            "Decisions and rewards",
            volume,
            dashed,
            "Decisions logged per bucket (solid) and how many of them have a reward (dashed).",
        ),
        (
            "exploration",
            "Exploration share",
            exploration,
            "",
            "Share of decisions that showed another candidate than the policy's own choice"
            " (OO_EXPLORATION).",
        ),
    ]
    return (
        '<div class="grid">'
        + "".join(
            f'<figure id="chart-{key}"><h3>{escape(title)}</h3>{legend(ps, extra)}{chart}'
            f"<figcaption>{escape(caption)}</figcaption></figure>"
            for key, title, chart, extra, caption in figures
        )
        + "</div>"
    )


def _policy_table(o: Overview) -> str:
    head = (
        '<table id="policies"><thead><tr><th>policy</th><th>decisions</th><th>rewarded</th>'
        "<th>default rewards</th><th>reward rate</th><th>±1.96 SE</th><th>join rate</th>"
        "<th>exploration share</th><th>users</th><th>share of decisions</th></tr></thead><tbody>"
    )
    total = o.total.decisions
    rows = []
    for p in o.policies:
        t = p.total
        se = t.reward_se
        cells = [
            ("decisions", count(t.decisions), t.decisions),
            ("rewarded", count(t.rewarded), t.rewarded),
            ("defaulted", count(t.defaulted), t.defaulted),
            ("reward_rate", num(t.reward_rate), t.reward_rate),
            ("reward_margin", num(None if se is None else Z95 * se), se),
            ("join_rate", pct(t.join_rate), t.join_rate),
            ("exploration_share", pct(t.exploration_share), t.exploration_share),
            ("users", count(p.users), p.users),
            ("decision_share", pct(t.decisions / total if total else None), None),
        ]
        rows.append(
            f'<tr data-policy="{escape(p.name)}"><td>{svg.swatch(p.colour)} {escape(p.name)}</td>'
            + "".join(
                f'<td data-field="{field}"'
                + (f' data-value="{value}"' if value is not None else "")
                + f">{escape(text)}</td>"
                for field, text, value in cells
            )
            + "</tr>"
        )
    return head + "".join(rows) + "</tbody></table>"


def _split(o: Overview) -> str:
    ps = o.policies
    configured = [
        svg.Segment(p.name, p.colour, p.configured_share or 0.0, "of users, by the split")
        for p in ps
    ]
    decisions = [
        svg.Segment(p.name, p.colour, float(p.total.decisions), f"{count(p.total.decisions)}")
        for p in ps
    ]
    users = [svg.Segment(p.name, p.colour, float(p.users), f"{count(p.users)} users") for p in ps]
    chart = svg.share_bars(
        [
            ("configured (users)", configured),
            ("observed decisions", decisions),
            ("observed users", users),
        ],
        label="configured split and observed shares of decisions and users",
    )
    return (
        f'<figure id="chart-split">{legend(ps)}{chart}<figcaption>The configured split'
        " assigns users by a stable hash of their id (OO_POLICY_SPLIT); the observed shares"
        " count this window's decisions, and the users each policy decided for (a user"
        " moved by a changed split counts under both).</figcaption></figure>"
    )


def _settings(o: Overview) -> str:
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td class=text>{escape(value)}</td></tr>"
        for name, value in o.settings
    )
    return (
        '<table class="settings" id="settings"><thead><tr><th>setting</th>'
        f'<th class="text">value</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def _footer() -> str:
    return (
        "<footer><b>Reward rate</b>: mean kept reward of the rewarded decisions (default"
        " rewards included), ± 1.96 standard errors of that mean. <b>Join rate</b>:"
        " decisions the client sent a reward for ÷ decisions. <b>Exploration share</b>:"
        " decisions that showed another candidate than the policy's own choice ÷ decisions."
        f" Times are UTC. oO ML Serving {escape(__version__)}.</footer>"
    )


# ── the saved evaluation ─────────────────────────────────────────────────────


def _evaluation(o: Overview) -> str:
    if o.evaluation_error is not None:
        return f'<div class="empty" id="evaluation">{escape(o.evaluation_error)}.</div>'
    e = o.evaluation
    if e is None:
        return (
            '<div class="empty" id="evaluation">No evaluation saved yet: run'
            " <code>oo-serving evaluate --save</code> against this database to estimate,"
            " from the decision log, what each policy is worth and whether it beats what"
            " runs.</div>"
        )
    parts = ['<div id="evaluation">', _evaluation_meta(e), _verdicts(e)]
    if e.enough:
        parts += _estimates(e)
    else:
        parts.append('<p class="note">Too few events to estimate anything yet.</p>')
    parts.append("</div>")
    return "".join(parts)


def _evaluation_meta(e: EvaluationView) -> str:
    span = f"{iso_text(e.first_ts)} → {iso_text(e.last_ts)}" if e.first_ts else "no events"
    requested = ""
    if e.since or e.until:
        requested = (
            f" (range asked for: {iso_text(e.since) if e.since else 'the start'} →"
            f" {iso_text(e.until) if e.until else 'now'})"
        )
    command = f" by <code>{escape(e.command)}</code>" if e.command else ""
    skipped = ""
    if e.skipped:
        items = ", ".join(f"{escape(k)} {count(v)}" for k, v in e.skipped)
        skipped = f'<p class="note">Read but not evaluated: {items}.</p>'
    return (
        f'<p class="meta">Computed at <b id="evaluation-time">{escape(when(e.created_ms))}</b>'
        f"{command}, over {count(e.events)} events of {count(e.users)} users logged"
        f" {escape(span)}{escape(requested)}.</p>{skipped}"
    )


def _verdicts(e: EvaluationView) -> str:
    if not e.verdicts:
        return f'<div class="verdict"><div>{escape(e.verdict)}</div></div>'
    lines = []
    for v in e.verdicts:
        cls = "" if v.better is None else ' class="better"' if v.better else ' class="worse"'
        text = v.text if v.text.startswith(v.policy) else f"{v.policy}: {v.text}"
        lines.append(f"<div{cls}>{escape(text)}</div>")
    return f'<div class="verdict">{"".join(lines)}</div>'


def _estimates(e: EvaluationView) -> list[str]:
    names = e.policies
    # Grey for what ran; the others from the third colour on, apart from the colours of
    # the serving policies in the charts above.
    colours = {name: (6 if name == LOGGING else 1 + i) for i, name in enumerate(names)}
    rows = []
    for name in names:
        est = e.estimate(name, "dr")
        if est is None:
            continue
        rows.append(
            svg.Interval(
                name,
                colours[name],
                est.value,
                (est.ci_low, est.ci_high),
                (est.cs_low, est.cs_high),
            )
        )
    logging = e.estimate(LOGGING, "dr")
    chart = svg.interval_chart(
        rows,
        label="doubly robust estimate of each policy's mean reward per decision",
        reference=None if logging is None else logging.value,
    )
    level = escape(e.level)
    head = (
        '<table id="estimates"><thead><tr><th>policy</th><th>DR estimate</th>'
        f"<th>{level} CI</th><th>anytime {level} CS</th><th>ESS</th>"
        f"<th>difference to {LOGGING}</th><th>its anytime CS</th></tr></thead><tbody>"
    )
    body = []
    for name in names:
        est = e.estimate(name, "dr")
        if est is None:
            continue
        diff = e.difference(name, "dr")
        body.append(
            f'<tr data-policy="{escape(name)}"><td>{escape(name)}</td>'
            f"<td>{num(est.value, 4)}</td><td>{_interval(est.ci_low, est.ci_high)}</td>"
            f"<td>{_interval(est.cs_low, est.cs_high)}</td><td>{num(est.ess, 1)}</td>"
            f"<td>{_signed(diff)}</td>"
            f"<td>{'' if diff is None else _interval(diff.cs_low, diff.cs_high, signed=True)}</td>"
            "</tr>"
        )
    note = (
        '<p class="note">DR: doubly robust estimate of the mean reward per decision each'
        " policy would earn, from the decision log. Thick bar: the interval at one look"
        " (CI); thin line: the anytime-valid confidence sequence (CS), the one the verdict"
        f" uses. Dashed line: {LOGGING}, what ran.</p>"
    )
    return [
        f'<figure id="chart-estimates">{chart}</figure>',
        f"{head}{''.join(body)}</tbody></table>{note}",
    ]


def _interval(low: float | None, high: float | None, *, signed: bool = False) -> str:
    def side(v: float | None, infinite: str) -> str:
        if v is None:
            return infinite
        return f"{v:+.4f}" if signed else f"{v:.4f}"

    return f"[{side(low, '−∞')}, {side(high, '+∞')}]"


def _signed(row: IntervalRow | None) -> str:
    if row is None or row.value is None:
        return ""
    return f"{row.value:+.4f}"


# ── one user ─────────────────────────────────────────────────────────────────


def user_page(u: UserView, *, root: str) -> str:
    parts = [
        f'<p class="meta"><a href="{escape(root)}/dashboard">← dashboard</a></p>',
        f'<h2 id="user">User <span class="mono">{escape(u.user_id)}</span></h2>',
        _facts(u),
    ]
    parts += [f'<p class="note">{escape(n)}</p>' for n in u.notes]
    parts.append(_weights(u))
    parts.append(_decisions(u, root))
    parts.append(f"<footer>Times are UTC; read at {escape(when(u.now_ms))}.</footer>")
    return document(f"User {u.user_id}", "\n".join(parts), root=root)


def _facts(u: UserView) -> str:
    mean = u.cumulative_reward / u.reward_count if u.reward_count else None
    facts = [
        ("serving policy", u.serving_policy, "serving_policy"),
        ("model learned by", u.model_policy or "no model yet", "model_policy"),
        ("decisions", count(u.pulls), "pulls"),
        ("rewards learned", count(u.reward_count), "reward_count"),
        ("mean learned reward", num(mean), "mean_reward"),
        ("last updated", when(u.last_updated_ms), "last_updated"),
    ]
    items = "".join(
        f'<div class="fact"><div class="label">{escape(label)}</div>'
        f'<div class="value" data-field="{key}">{escape(value)}</div></div>'
        for label, value, key in facts
    )
    return f'<div class="facts">{items}</div>'


def _weights(u: UserView) -> str:
    if not u.weights:
        return ""
    chart = svg.weight_bars(u.weights, label="the user's model weights by feature")
    rows = "".join(
        f'<tr data-feature="{escape(name)}"><td class="mono">{escape(name)}</td>'
        f'<td data-value="{value!r}">{value:+.4f}</td></tr>'
        for name, value in u.weights
    )
    policy = u.model_policy or u.serving_policy
    return (
        f'<h2>Model weights θ <span class="note">({escape(policy)})</span></h2>'
        f'<div class="two"><figure id="chart-weights">{chart}</figure><div><table id="weights"><thead><tr>'
        f"<th>feature</th><th>θ</th></tr></thead><tbody>{rows}</tbody></table>"
        '<p class="note">The weights the policy estimates for this user (its population'
        " prior included, for linucb-v2): a candidate's expected reward is θ · x, before"
        " the exploration bonus.</p></div></div>"
    )


def _decisions(u: UserView, root: str) -> str:
    title = f'<h2>Recent decisions <span class="note">(newest first, up to {u.limit})</span></h2>'
    if not u.decisions:
        return title + '<div class="empty">No decision of this user is in the log.</div>'
    parts = [title, '<div id="decisions">']
    parts += [_decision(d, open_=i < 3) for i, d in enumerate(u.decisions)]
    parts.append("</div>")
    if u.more:
        more = min(u.limit * 5, 200)
        parts.append(
            f'<p class="note">Older decisions are in the log: <a href="'
            f'{escape(user_path(root, u.user_id))}?limit={more}">show up to {more}</a>.</p>'
        )
    return "".join(parts)


def _decision(d: DecisionView, *, open_: bool) -> str:
    badges = [f'<span class="badge">{escape(d.policy)}</span>']
    badges.append(f'<span class="badge">p = {d.propensity:.3f}</span>')
    if d.explored:
        badges.append('<span class="badge explored">explored</span>')
    if d.reward is None:
        badges.append('<span class="badge noreward">no reward yet</span>')
    else:
        badges.append(f'<span class="badge reward">reward {d.reward:g}</span>')
    summary = (
        f'<summary><span class="when">{escape(when(d.ts_ms))}</span>'
        f'<span class="tip">shown: <span class="mono">{escape(d.tip_id)}</span></span>'
        f"{''.join(badges)}</summary>"
    )
    return (
        f'<details class="decision" data-event="{escape(d.event_id)}"'
        f"{' open' if open_ else ''}>{summary}{_decision_facts(d)}{_candidates(d)}</details>"
    )


def _decision_facts(d: DecisionView) -> str:
    context = ", ".join(f"{escape(k)} {v}" for k, v in d.context.items()) or "none logged"
    if d.reward is None:
        reward = "none yet"
    else:
        how = "learned" if d.learned else "stored, not learned (after the reward window)"
        source = d.reward_source or "client"
        reward = (
            f"{d.reward:g} ({escape(source)}, {how}), first at {escape(when(d.rewarded_ms))};"
            f" {count(d.reward_n)} reward{'' if d.reward_n == 1 else 's'} received"
        )
    explored = {None: "not logged", True: "yes", False: "no"}[d.explored]
    return (
        f'<p class="note">event <span class="mono">{escape(d.event_id)}</span> · decision'
        f" #{d.seq} · context: {context} · explored: {explored} · reward: {reward}</p>"
    )


def _candidates(d: DecisionView) -> str:
    head = (
        '<table class="candidates"><thead><tr><th>#</th><th class="text">candidate</th><th>hour</th>'
        "<th>overdue</th><th>age (days)</th><th>priority</th><th>probability</th>"
        '<th class="text">chosen by</th></tr></thead><tbody>'
    )
    rows = [_candidate(c) for c in d.candidates]
    hidden = d.offered - len(d.candidates)
    tail = "</tbody></table>"
    if hidden > 0:
        tail += f'<p class="note">… and {count(hidden)} more candidates, not listed.</p>'
    return head + "".join(rows) + tail


def _candidate(c: CandidateView) -> str:
    f = c.features
    if f is None:
        cells = '<td colspan="4" class="note">not logged</td>'
    else:
        cells = (
            f"<td>{int(f['hour_of_day'])}</td><td>{'yes' if f['is_overdue'] else 'no'}</td>"
            f"<td>{float(f['task_age_days']):g}</td><td>{int(f['priority'])}</td>"
        )
    marks = _marks(c.shown, c.greedy, c.shadows)
    bar = (
        f'<svg class="pbar" width="60" height="8" aria-hidden="true">'
        f'<rect width="60" height="8" fill="#eaeef2"/>'
        f'<rect width="{60 * min(max(c.probability, 0.0), 1.0):.1f}" height="8" fill="{svg.PALETTE[0]}"/></svg>'
    )
    shown = ' class="shown"' if c.shown else ""
    return (
        f'<tr{shown}><td>{c.index}</td><td class="text mono">{escape(c.tip_id)}</td>{cells}'
        f'<td>{c.probability:.3f} {bar}</td><td class="marks">{marks}</td></tr>'
    )


def _marks(shown: bool, greedy: bool, shadows: Iterable[str]) -> str:
    marks = []
    if shown:
        marks.append("<b>shown</b>")
    if greedy:
        marks.append("policy")
    marks += [f"shadow {escape(name)}" for name in shadows]
    return " · ".join(marks)

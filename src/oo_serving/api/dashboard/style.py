"""The dashboard's one stylesheet, served at /dashboard/static/dashboard.css."""

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa;
        --accent: #0969da; --good: #1a7f37; --bad: #cf222e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); margin: 0; background: #ffffff; }
main { max-width: 1320px; margin: 0 auto; padding: 0 24px 48px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
              font-size: 0.92em; }
header.top { border-bottom: 1px solid var(--line); background: var(--soft); }
header.top .bar { max-width: 1320px; margin: 0 auto; padding: 12px 24px; display: flex;
                  flex-wrap: wrap; align-items: center; gap: 12px 28px; }
header.top h1 { font-size: 18px; margin: 0; font-weight: 650; }
header.top h1 a { color: var(--ink); }
nav.windows { display: flex; gap: 4px; }
nav.windows a { padding: 4px 10px; border: 1px solid var(--line); border-radius: 6px;
                color: var(--ink); background: #ffffff; }
nav.windows a.current { background: var(--ink); color: #ffffff; border-color: var(--ink); }
form.lookup { display: flex; gap: 6px; margin-left: auto; }
form.lookup input { font: inherit; padding: 4px 8px; border: 1px solid var(--line);
                    border-radius: 6px; width: 220px; }
form.lookup button { font: inherit; padding: 4px 12px; border: 1px solid var(--ink);
                     border-radius: 6px; background: var(--ink); color: #ffffff;
                     cursor: pointer; }
p.meta { color: var(--muted); margin: 14px 0 4px; }
h2 { font-size: 16px; margin: 28px 0 10px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 0 0 6px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr));
         gap: 14px; margin-top: 14px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .name { display: flex; align-items: center; gap: 8px; font-weight: 650;
              font-size: 15px; }
.card .served { color: var(--muted); font-size: 12px; margin-left: auto; font-weight: 400; }
.card .big { font-size: 26px; font-weight: 650; margin: 6px 0 0; }
.card .big small { font-size: 13px; font-weight: 400; color: var(--muted); }
.card dl { display: grid; grid-template-columns: auto auto; gap: 2px 12px; margin: 8px 0 0; }
.card dt { color: var(--muted); }
.card dd { margin: 0; text-align: right; font-variant-numeric: tabular-nums; }
.trend { margin: 4px 0 0; font-size: 13px; }
.trend.up { color: var(--good); }
.trend.down { color: var(--bad); }
.trend.steady, .trend.unknown { color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr));
        gap: 8px 24px; }
figure { margin: 0; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 2px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin: 0 0 4px;
          font-size: 12px; color: var(--muted); }
.legend span { display: inline-flex; align-items: center; gap: 5px; }
svg.chart { max-width: 100%; height: auto; display: block; }
svg.swatch { display: inline-block; vertical-align: middle; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right;
         vertical-align: top; }
th { font-weight: 600; color: var(--muted); background: var(--soft); }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
table.settings td:first-child { font-family: ui-monospace, Menlo, Consolas, monospace; }
.note { color: var(--muted); font-size: 13px; }
.empty { color: var(--muted); background: var(--soft); border: 1px dashed var(--line);
         border-radius: 8px; padding: 14px 16px; }
.verdict { font-size: 15px; font-weight: 600; background: var(--soft);
           border-left: 4px solid var(--ink); padding: 8px 12px; margin: 10px 0; }
.verdict div + div { margin-top: 4px; }
.verdict .better { color: var(--good); }
.verdict .worse { color: var(--bad); }
#chart-estimates { margin: 6px 0 12px; }
#estimates td { white-space: nowrap; }
.two { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr));
       gap: 8px 32px; align-items: start; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px;
         border: 1px solid var(--line); color: var(--muted); white-space: nowrap; }
.badge.explored { border-color: #e69f00; color: #8a5a00; background: #fff8e6; }
.badge.reward { border-color: #1a7f37; color: #1a7f37; background: #effaf1; }
.badge.noreward { background: var(--soft); }
details.decision { border: 1px solid var(--line); border-radius: 8px; margin: 8px 0;
                   padding: 0 12px; }
details.decision[open] { padding-bottom: 10px; }
details.decision summary { cursor: pointer; padding: 8px 0; display: flex;
                           flex-wrap: wrap; gap: 6px 14px; align-items: center; }
details.decision summary .when { color: var(--muted); font-variant-numeric: tabular-nums; }
details.decision summary .tip { font-weight: 600; }
tr.shown td { background: #eef6ff; }
.pbar { display: inline-block; vertical-align: middle; }
.marks { white-space: nowrap; text-align: left; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
         gap: 10px; margin: 12px 0; }
.fact { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
.fact .label { color: var(--muted); font-size: 12px; }
.fact .value { font-size: 18px; font-weight: 600; overflow-wrap: anywhere; }
.error-page { max-width: 640px; margin: 64px auto; }
footer { color: var(--muted); font-size: 12px; margin-top: 36px;
         border-top: 1px solid var(--line); padding-top: 10px; }
"""

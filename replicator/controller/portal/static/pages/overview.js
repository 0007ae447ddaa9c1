// Overview: the fleet at a glance -- health donut, machines by state, RPO breaches, jobs needing input,
// configuration problems, and errors by cause with the number of machines affected. Everything is derived
// from the REST API's lists; machine and job changes arrive on the live stream.

import { api, clear, fmtDuration, h, section, ago, stateBadge } from '../lib.js';
import { subscribe } from '../events.js';
import { rpoTarget, machineLink, problemsOf } from './common.js';
import { causeOf, daysSinceTest, openAndFailedJobs, reportedStats, succeededFailovers, TEST_RECOMMENDED_DAYS } from './machine_data.js';

const HEALTH = ['Normal', 'Warning', 'Critical', 'Unknown'];
const COLORS = { Normal: '#16a34a', Warning: '#d97706', Critical: '#dc2626', Unknown: '#94a3b8' };
const DAY = 86400 * 1000;

export async function render(view) {
  const [machines, jobs, policies, hosts, pairs, observed, tests] = await Promise.all([
    api('/v1/machines'), openAndFailedJobs(), api('/v1/policies'), api('/v1/hosts'), api('/v1/pairs'),
    api('/v1/observed/machines'), succeededFailovers()]);
  // plan runs waiting on an operator are runs, not jobs: the newest run of each plan
  const plans = await api('/v1/plans');
  const runs = new Map((await Promise.all(plans.map((p) => api(`/v1/plans/${encodeURIComponent(p.name)}/runs`))))
    .filter((r) => r.length).map((r) => [r[0].id, r[0]]));
  const byId = new Map(machines.map((x) => [x.id, x]));

  const donutCanvas = h('canvas', { id: 'health-donut', 'aria-label': 'machines by health', role: 'img' });
  const counts = h('ul', { class: 'plain', id: 'health-counts' });
  const states = h('div', { id: 'by-state' });
  const breaches = h('div', { id: 'rpo-breaches' });
  const waiting = h('div', { id: 'needs-input' });
  const jobStats = h('div', { id: 'job-stats' });
  const config = h('div', { id: 'config-problems' });
  const freshness = h('div', { id: 'test-freshness' });
  const errors = h('div', { id: 'errors-by-cause' });
  clear(view,
    h('h1', {}, 'Overview'),
    h('div', { class: 'grid' },
      section('Replication health', h('div', { class: 'chart-box' }, donutCanvas), counts),
      section('Machines by state', states),
      section('Jobs', jobStats, h('h3', {}, 'Waiting for input'), waiting)),
    h('div', { class: 'grid' },
      section('RPO breaches', breaches),
      section('Configuration problems', config, h('h3', {}, 'Test failover'), freshness),
      section('Errors by cause', errors)));

  const chart = new window.Chart(donutCanvas, {
    type: 'doughnut',
    data: { labels: HEALTH, datasets: [{ data: [0, 0, 0, 0], backgroundColor: HEALTH.map((k) => COLORS[k]) }] },
    options: { maintainAspectRatio: false, animation: false, plugins: { legend: { position: 'right' } } },
  });

  function draw() {
    const all = [...byId.values()];
    const health = Object.fromEntries(HEALTH.map((k) => [k, 0]));
    for (const x of all) health[HEALTH.includes(x.health) ? x.health : 'Unknown'] += 1;
    chart.data.datasets[0].data = HEALTH.map((k) => health[k]);
    chart.update();
    clear(counts, HEALTH.map((k) => h('li', { 'data-health': k }, h('span', { class: 'stat-inline' }, `${k}: `),
      h('strong', {}, String(health[k])))));

    const byState = {};
    for (const x of all) { const s = x.observed_state || `(not reported; ${x.desired_state})`; byState[s] = (byState[s] || 0) + 1; }
    const stateRows = Object.entries(byState).sort((a, b) => b[1] - a[1]);
    clear(states, stateRows.length ? h('table', { class: 'data' }, h('tbody', {}, stateRows.map(([s, n]) =>
      h('tr', {}, h('td', {}, s), h('td', {}, String(n)))))) : h('p', { class: 'muted' }, 'No protected machines yet.'));

    const late = all.filter((x) => x.rpo_seconds !== null && rpoTarget(x, policies) !== null && x.rpo_seconds > rpoTarget(x, policies));
    clear(breaches, late.length ? h('table', { class: 'data' }, h('tbody', {}, late.map((x) => h('tr', {},
      h('td', {}, machineLink(x.name)), h('td', { class: 'breach' }, `RPO ${fmtDuration(x.rpo_seconds)}`),
      h('td', {}, `target ${fmtDuration(rpoTarget(x, policies))}`), h('td', {}, `last success ${ago(x.last_success_at)}`)))))
      : h('p', { class: 'muted' }, 'Every machine is within its RPO target.'));
  }

  function drawJobs() {
    const now = Date.now();
    const running = jobs.filter((j) => j.state === 'running' || j.state === 'queued');
    const failed = jobs.filter((j) => j.state === 'failed' && j.finished_at && now - new Date(j.finished_at) < DAY);
    const input = jobs.filter((j) => j.state === 'waiting_for_input');
    const runsWaiting = [...runs.values()].filter((r) => r.state === 'waiting_for_input');
    clear(jobStats, h('ul', { class: 'plain' },
      h('li', { id: 'jobs-running' }, h('a', { href: '#/jobs' }, `${running.length} in progress`)),
      h('li', { id: 'jobs-failed' }, h('a', { href: '#/jobs' }, `${failed.length} failed in the last 24 hours`)),
      h('li', { id: 'jobs-waiting' }, `${input.length + runsWaiting.length} waiting for input`)));
    clear(waiting, input.length + runsWaiting.length ? h('ul', { class: 'plain' },
      runsWaiting.map((r) => h('li', {}, h('a', { href: `#/plans/${encodeURIComponent(r.plan)}` }, `plan ${r.plan}`),
        ` ${r.kind} failover, group ${r.current_group}: a manual action to confirm`)),
      input.map((j) => h('li', {}, h('a', { href: `#/jobs/${j.id}` }, `#${j.id} ${j.kind}`), ' ', j.machine || '', ' ',
        stateBadge(j.state), ' ', j.message)))
      : h('p', { class: 'muted' }, 'Nothing is waiting for an operator.'));

    // Errors by cause: what the hosts give as the reasons of a health that is not Normal, and the messages of
    // the last day's failed jobs, each with the machines it hits.
    const causes = new Map();
    const count = (cause, machine, job) => {
      if (!causes.has(cause)) causes.set(cause, { jobs: 0, machines: new Set() });
      if (job) causes.get(cause).jobs += 1;
      if (machine) causes.get(cause).machines.add(machine);
    };
    for (const o of observed) for (const r of reportedStats(o).health_reasons || []) count(causeOf(r), o.machine, false);
    for (const j of failed) count(j.message || `${j.kind} failed`, j.machine, true);
    const rows = [...causes.entries()].sort((a, b) => b[1].machines.size - a[1].machines.size || b[1].jobs - a[1].jobs);
    clear(errors, rows.length ? h('table', { class: 'data' }, h('thead', {}, h('tr', {}, h('th', {}, 'Cause'),
      h('th', {}, 'Machines'), h('th', {}, 'Jobs'))), h('tbody', {}, rows.map(([cause, v]) => h('tr', {},
      h('td', {}, cause), h('td', {}, String(v.machines.size)), h('td', {}, String(v.jobs))))))
      : h('p', { class: 'muted' }, 'No host reports a problem; no job failed in the last 24 hours.'));
  }

  const problems = problemsOf({ machines, hosts, pairs });
  clear(config, problems.length ? h('ul', { class: 'plain' }, problems.map((p) => h('li', {}, p)))
    : h('p', { class: 'muted' }, 'No configuration problems found.'));

  const stale = machines.filter((x) => x.desired_state !== 'disabled' && daysSinceTest(x.name, tests) > TEST_RECOMMENDED_DAYS);
  clear(freshness, stale.length ? h('p', {}, `Test recommended for ${stale.length} of ${machines.length} machines `
    + `(none in the last ${TEST_RECOMMENDED_DAYS} days): `, stale.map((x, i) => [i ? ', ' : '', machineLink(x.name)]))
    : h('p', { class: 'muted' }, `Every machine had a test failover in the last ${TEST_RECOMMENDED_DAYS} days.`));

  draw();
  drawJobs();
  const offs = [
    subscribe('machine', (ev) => { const x = byId.get(ev.id); if (x) { Object.assign(x, ev); draw(); } }),
    subscribe('plan_run', (ev) => { runs.set(ev.id, ev); drawJobs(); }),
    subscribe('job', (ev) => {
      const i = jobs.findIndex((j) => j.id === ev.id);
      if (i >= 0) Object.assign(jobs[i], ev); else jobs.unshift(ev);
      drawJobs();
    }),
  ];
  return () => { offs.forEach((off) => off()); chart.destroy(); };
}

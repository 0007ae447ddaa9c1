// One machine: what it is and where it replicates, its RPO against the target over time (the controller's
// samples of the last day, then each report as it comes), its cycles' sizes and durations, the recovery points
// its replica host holds, its extended replication to a third site (when its pair has an extended leg), its disks, its jobs and audit entries, and the actions an operator may take (each
// confirmed, each one REST call; the failover steps only when they apply).

import { api, ago, clear, confirmAndCall, dataTable, fmtBytes, fmtDuration, fmtTime, h, healthBadge, section, session,
         stateBadge } from '../lib.js';
import { subscribe } from '../events.js';
import { FORCE, rpoTarget } from './common.js';
import { SITE_KINDS, cyclesOf, failoverSteps, lastTestFailover, reportedStats } from './machine_data.js';

const RPO_POINTS = 3000;                  // a day of the controller's samples (one a minute) and live ones
const RPO_WINDOW_MS = 10 * 60 * 1000;
const HISTORY_MS = 24 * 3600 * 1000;
const POINTS_SHOWN = 12;
const POINTS_EVERY_MS = 15000;

export async function render(view, [name]) {
  const path = `/v1/machines/${encodeURIComponent(name)}`;
  const observedPath = `/v1/observed/machines?machine=${encodeURIComponent(name)}`;
  const since = new Date(Date.now() - HISTORY_MS).toISOString();
  const [machine, policies, jobs, mine, [observedFirst], history, pointsFirst] = await Promise.all([
    api(path), api('/v1/policies'), api(`/v1/jobs?machine=${encodeURIComponent(name)}&limit=200`),
    api(`${path}/audit?limit=200`), api(observedPath), api(`${path}/history?since=${encodeURIComponent(since)}`),
    api(`${path}/points`)]);
  let observed = observedFirst;
  let points = pointsFirst;
  const target = () => rpoTarget(machine, policies);

  const summary = h('dl', { class: 'kv', id: 'machine-summary' });
  const actions = h('div', { class: 'actions', id: 'machine-actions' });
  const canvas = h('canvas', { id: 'rpo-chart', role: 'img', 'aria-label': 'RPO over time' });
  const jobsBox = h('div', { id: 'machine-jobs' });
  const reported = h('div', { id: 'machine-reported' });
  const cycleCanvas = h('canvas', { id: 'cycle-chart', role: 'img', 'aria-label': 'Cycle sizes and durations' });
  const pointsBox = h('div', { id: 'machine-points' });
  const extendedBox = h('div', { id: 'machine-extended' });

  function drawSummary() {
    const test = lastTestFailover(name, jobs);
    clear(summary,
      h('dt', {}, 'Health'), h('dd', { id: 'machine-health' }, healthBadge(machine.health)),
      h('dt', {}, 'State'), h('dd', { id: 'machine-state' }, machine.observed_state || '(not reported yet)'),
      h('dt', {}, 'Protection'), h('dd', { id: 'machine-desired' }, machine.desired_state),
      h('dt', {}, 'RPO now / target'), h('dd', { id: 'machine-rpo' }, `${fmtDuration(machine.rpo_seconds)} / ${fmtDuration(target())}`),
      h('dt', {}, 'Last success'), h('dd', {}, machine.last_success_at ? `${fmtTime(machine.last_success_at)} (${ago(machine.last_success_at)})` : 'never'),
      h('dt', {}, 'Last test failover'), h('dd', {}, test ? fmtTime(test.finished_at) : 'never'),
      h('dt', {}, 'Cloud'), h('dd', {}, machine.cloud),
      h('dt', {}, 'Policy'), h('dd', {}, machine.policy || '—'),
      h('dt', {}, 'Primary host'), h('dd', {}, machine.primary_host || '—'),
      h('dt', {}, 'Replica host'), h('dd', {}, machine.replica_host || '—'),
      h('dt', {}, 'Owner site / epoch'), h('dd', {}, `${machine.owner_site || '—'} / ${machine.fencing_epoch}`));
  }

  function drawReported() {
    const side = observed?.primary;
    if (!side) { clear(reported, h('p', { class: 'muted' }, 'Its primary host has not reported this machine yet.')); return; }
    const st = reportedStats(observed);
    const e = side.entry;
    const reasons = st.health_reasons || [];
    const last = e.last_cycle;
    clear(reported,
      reasons.length ? h('ul', { id: 'health-reasons', class: 'plain breach' }, reasons.map((r) => h('li', {}, r)))
        : h('p', { id: 'health-reasons' }, 'No health problem reported.'),
      h('dl', { class: 'kv' },
        h('dt', {}, 'Reported by'), h('dd', {}, `${side.host}, ${ago(side.received_at)}`),
        e.reason ? [h('dt', {}, 'Reason'), h('dd', {}, e.reason)] : null,
        h('dt', {}, 'Pending'), h('dd', { id: 'machine-pending' }, fmtBytes(st.pending_size)),
        h('dt', {}, 'Cycles'), h('dd', { id: 'machine-cycles' }, `${st.successful_cycles ?? 0} succeeded, ${st.failed_cycles ?? 0} failed, ${st.missed_cycles ?? 0} missed`),
        h('dt', {}, 'Cycle size'), h('dd', {}, `average ${fmtBytes(st.average_size)}, largest ${fmtBytes(st.maximum_size)}`),
        h('dt', {}, 'Cycle duration'), h('dd', {}, `average ${fmtDuration(st.average_latency)}, longest ${fmtDuration(st.maximum_latency)}`),
        h('dt', {}, 'Last cycle'), h('dd', {}, last ? `${(last.kinds || []).join(', ')}: ${fmtBytes(last.bytes_sent)} sent${typeof last.seconds === 'number' ? ` in ${fmtDuration(last.seconds)}` : ''}, ${ago(new Date(last.time * 1000).toISOString())}` : '—'),
        st.last_error ? [h('dt', {}, 'Last error'), h('dd', { class: 'breach' }, st.last_error)] : null,
        h('dt', {}, 'Disks'), h('dd', {}, Object.entries(e.disks || {}).map(([n, d]) => h('div', {}, `${n}: ${d.tracking}${d.reason ? ` (${d.reason})` : ''}`)))));
  }

  function drawPoints() {
    if (!points.reported_at) {
      clear(pointsBox, h('p', { class: 'muted', id: 'points-summary' }, 'Its replica host has not reported recovery points yet.'));
      return;
    }
    const n = points.points.length;
    clear(pointsBox,
      h('p', { class: 'muted', id: 'points-summary' }, `${n} recovery point${n === 1 ? '' : 's'} on ${points.host || 'a removed host'}, reported ${ago(points.reported_at)}${n > POINTS_SHOWN ? `; the newest ${POINTS_SHOWN}:` : ''}`),
      dataTable([
        { key: 'point', label: 'Point' },
        { key: 'time', label: 'Data from', render: (p) => `${fmtTime(p.time)} (${ago(p.time)})` },
        { key: 'consistency', label: 'Consistency' },
        { key: 'generations', label: 'Disk generations', value: (p) => Object.values(p.generations).join(', ') },
      ], [...points.points].reverse().slice(0, POINTS_SHOWN), { empty: 'No recovery point holds all its disks yet.', id: 'machine-point-table' }));
  }

  function drawExtended() {
    // the leg as the replica host last reported it (Measure-VMReplication -ReplicationRelationshipType Extended)
    const x = machine.extended;
    if (!x) { clear(extendedBox, h('p', { class: 'muted' }, 'Its pair has no extended leg any more.')); return; }
    clear(extendedBox, h('dl', { class: 'kv' },
      h('dt', {}, 'Relationship'), h('dd', {}, x.relationship),
      h('dt', {}, 'State'), h('dd', { id: 'extended-state' }, x.state || '(not reported yet)'),
      h('dt', {}, 'Health'), h('dd', { id: 'extended-health' }, healthBadge(x.health)),
      x.reason ? [h('dt', {}, 'Reason'), h('dd', { id: 'extended-reason' }, x.reason)] : null,
      h('dt', {}, 'Last success'), h('dd', { id: 'extended-last-success' }, x.last_success_at ? `${fmtTime(x.last_success_at)} (${ago(x.last_success_at)})` : 'never'),
      h('dt', {}, 'Third site'), h('dd', { id: 'extended-host' }, `${x.host || '(no host placed yet)'} in cloud ${x.cloud}`),
      h('dt', {}, 'Target'), h('dd', {}, x.target || '—')));
  }

  async function refreshPoints() {
    try { points = await api(`${path}/points`); drawPoints(); } catch { /* shown again at the next look */ }
    if (!machine.extended) return;
    // the replica host's report of the leg moves no machine row either
    try { machine.extended = (await api(path)).extended; drawExtended(); } catch { /* at the next look */ }
  }

  function act(label, what, call, body, danger) {
    const force = body?.kind === 'unplanned' ? FORCE : undefined;
    return h('button', { type: 'button', class: danger ? 'danger' : null, 'data-action': call.split('/').pop() + (body?.kind ? `-${body.kind}` : ''),
      onclick: async () => {
        const job = await confirmAndCall(label, `${what} (machine ${name})`, `${path}/${call}`, { body, label, force });
        if (job) { jobs.unshift(job); drawJobs(); await refresh(); }
      } }, label);
  }

  function drawActions() {
    if (!session.can('operator')) { clear(actions); return; }
    const d = machine.desired_state;
    const steps = failoverSteps(jobs);
    clear(actions,
      steps.failedOver && act('Commit failover', 'Keep the machine on its recovery site: the failover becomes final and cannot be cancelled any more.', 'commit-failover', undefined, true),
      steps.failedOver && act('Cancel failover', 'Give the machine back to its primary site, which replicates again (what changed on the recovery site is lost).', 'cancel-failover', undefined, true),
      steps.testing && act('Clean up test failover', 'Remove the test machine and its disks on the replica host.', 'cleanup-test-failover'),
      !steps.busy && machine.direction === 'committed' && act('Reverse replication', 'Replicate the machine from its recovery site back to its primary site (the primary host accepts it).', 'reverse', undefined, true),
      !steps.busy && machine.direction === 'reversed' && act('Fail back', 'Stop the machine on the recovery site, send its last changes, and run it on its primary site again (no data loss).', 'failback', undefined, true),
      d === 'enabled' && act('Pause', 'Pause replication; the replica keeps its recovery points.', 'pause'),
      d === 'paused' && act('Resume', 'Resume replication.', 'resume'),
      d === 'enabled' && act('Resync', 'Compare both sides and send what differs.', 'resync'),
      d !== 'disabled' && act('Test failover', 'Start a test copy from the latest recovery point on an isolated network; replication goes on.', 'failover', { kind: 'test' }),
      d !== 'disabled' && act('Planned failover', 'Stop the primary, send the last changes, and run the machine on the replica site (no data loss).', 'failover', { kind: 'planned' }, true),
      d !== 'disabled' && act('Unplanned failover', 'Run the machine on the replica site from its latest recovery point (the primary is lost).', 'failover', { kind: 'unplanned' }, true),
      d !== 'disabled' && act('Disable protection', 'Stop protecting this machine.', 'disable', undefined, true),
      d === 'disabled' && act('Enable protection', 'Protect this machine again.', 'enable'));
  }

  function drawJobs() {
    clear(jobsBox, dataTable([
      { key: 'id', label: 'Job', render: (j) => h('a', { href: `#/jobs/${j.id}` }, `#${j.id}`) },
      { key: 'kind', label: 'Kind', value: (j) => j.kind + (j.params?.kind ? ` (${j.params.kind})` : '') },
      { key: 'state', label: 'State', render: (j) => stateBadge(j.state) },
      { key: 'progress', label: 'Progress', render: (j) => `${j.progress}%` },
      { key: 'message', label: 'Message' },
      { key: 'created_at', label: 'Created', render: (j) => fmtTime(j.created_at) },
    ], jobs, { empty: 'No jobs for this machine.', id: 'machine-job-table' }));
  }

  async function refresh() {
    Object.assign(machine, await api(path));
    drawSummary(); drawActions(); if (machine.extended) drawExtended();
  }

  clear(view,
    h('h1', {}, h('a', { href: '#/items' }, 'Replicated items'), ' / ', name),
    h('div', { class: 'grid' }, section('Summary', summary, actions),
      section('RPO over time', h('div', { class: 'chart-box wide' }, canvas),
        h('p', { class: 'muted', id: 'rpo-note' }, `The last day as the controller sampled it (one sample a minute at most, kept ${Math.round(history.retention_seconds / 86400)} days), then each report while this page is open; the dashed line is the target.`))),
    machine.extended && section('Extended replication', extendedBox),
    h('div', { class: 'grid' }, section('Recovery points', pointsBox),
      section('Cycles', h('div', { class: 'chart-box' }, cycleCanvas),
        h('p', { class: 'muted' }, 'Each replication cycle of the last day: bytes sent and, where the host reports it, how long it took.'))),
    h('div', { class: 'grid' }, section('As its hosts report', reported),
      section('Disks', h('ul', { class: 'plain', id: 'machine-disks' },
        machine.domain ? h('li', {}, `libvirt domain ${machine.domain}`) : null,
        machine.disks.map((d) => h('li', {}, d)),
        machine.excluded.map((d) => h('li', { class: 'muted' }, `${d} (excluded)`)))),
      section('Events (audit log)', dataTable([
        { key: 'at', label: 'When', render: (a) => fmtTime(a.at) },
        { key: 'actor', label: 'Who' }, { key: 'action', label: 'What' }, { key: 'outcome', label: 'Outcome' },
      ], mine, { empty: 'No actions recorded on this machine.', id: 'machine-events' }))),
    section('Jobs', jobsBox));

  const samples = history.samples.filter((s) => s.rpo_seconds !== null)
    .map((s) => ({ x: new Date(s.at).getTime(), y: s.rpo_seconds })).slice(-RPO_POINTS);
  const chart = new window.Chart(canvas, {
    type: 'line',
    data: { datasets: [
      { label: 'RPO (s)', data: samples, borderColor: '#2563eb', pointRadius: 2, tension: 0 },
      { label: 'target (s)', data: [], borderColor: '#dc2626', borderDash: [6, 4], pointRadius: 0 }] },
    options: { maintainAspectRatio: false, animation: false, parsing: false,
      scales: { x: { type: 'linear', ticks: { maxTicksLimit: 6, callback: (v) => new Date(v).toLocaleTimeString() } },
                y: { beginAtZero: true, title: { display: true, text: 'seconds' } } } },
  });
  const cycles = cyclesOf(history.samples);
  const cycleChart = new window.Chart(cycleCanvas, {
    type: 'bar',
    data: { datasets: [
      { type: 'bar', label: 'bytes sent (MiB)', data: cycles.map((c) => ({ x: c.x, y: c.bytes / 1048576 })), backgroundColor: '#93c5fd', yAxisID: 'y' },
      { type: 'line', label: 'duration (s)', data: cycles.filter((c) => c.seconds !== null && c.seconds !== undefined).map((c) => ({ x: c.x, y: c.seconds })),
        borderColor: '#7c3aed', pointRadius: 2, yAxisID: 'y1' }] },
    options: { maintainAspectRatio: false, animation: false, parsing: false,
      scales: { x: { type: 'linear', ticks: { maxTicksLimit: 6, callback: (v) => new Date(v).toLocaleTimeString() } },
                y: { beginAtZero: true, title: { display: true, text: 'MiB' } },
                y1: { beginAtZero: true, position: 'right', grid: { drawOnChartArea: false }, title: { display: true, text: 'seconds' } } } },
  });
  function sample() {
    if (machine.rpo_seconds !== null && machine.rpo_seconds !== undefined) {
      samples.push({ x: Date.now(), y: machine.rpo_seconds });
      if (samples.length > RPO_POINTS) samples.shift();
    }
    redraw();
  }
  function redraw() {
    // the axis spans the samples and at least the last ten minutes, ending now
    const now = Date.now();
    const from = Math.min(samples.length ? samples[0].x : now, now - RPO_WINDOW_MS);
    chart.options.scales.x.min = from;
    chart.options.scales.x.max = now;
    const t = target();
    chart.data.datasets[1].data = t !== null ? [{ x: from, y: t }, { x: now, y: t }] : [];
    chart.update();
  }

  drawSummary(); drawActions(); drawJobs(); drawReported(); drawPoints(); sample();
  if (machine.extended) drawExtended();
  const tick = setInterval(redraw, 15000);     // the axis moves on; points come from reports only
  const pointsTick = setInterval(refreshPoints, POINTS_EVERY_MS);   // the replica's reports move no machine row
  const offs = [
    subscribe('machine', async (ev) => {
      if (ev.name !== name) return;
      Object.assign(machine, ev); drawSummary(); drawActions(); sample();
      if (extendedBox.isConnected) drawExtended();
      try { [observed] = await api(observedPath); drawReported(); } catch { /* shown at the next report */ }
    }),
    subscribe('job', (ev) => {
      if (ev.machine !== name) return;
      const i = jobs.findIndex((j) => j.id === ev.id);
      if (i >= 0) Object.assign(jobs[i], ev); else jobs.unshift(ev);
      drawJobs(); drawSummary(); drawActions();
      // a failover-family job that ends moves the machine's direction, which no machine column carries
      if (SITE_KINDS.has(ev.kind) && ['succeeded', 'failed', 'cancelled'].includes(ev.state)) refresh().catch(() => {});
    }),
  ];
  return () => { offs.forEach((off) => off()); clearInterval(tick); clearInterval(pointsTick); chart.destroy(); cycleChart.destroy(); };
}

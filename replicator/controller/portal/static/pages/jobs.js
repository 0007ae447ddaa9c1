// Jobs: every long operation, newest first, with live progress, rate and ETA (from the progress made since
// the job started), cancel where the role allows, and one job's log at #/jobs/ID.

import { api, ago, clear, confirmAndCall, dataTable, fmtDuration, fmtTime, h, progressBar, section, session,
         stateBadge } from '../lib.js';
import { subscribe } from '../events.js';
import { machineLink } from './common.js';

const OPEN = new Set(['queued', 'running', 'waiting_for_input']);

/** Percent per minute since the job started, and the seconds left at that pace (null when unknown). */
export function pace(job, now = Date.now()) {
  if (job.state !== 'running' || !job.started_at || !job.progress) return { rate: null, eta: null };
  const elapsed = (now - new Date(job.started_at).getTime()) / 1000;
  if (elapsed <= 0) return { rate: null, eta: null };
  const perSecond = job.progress / elapsed;
  return { rate: perSecond * 60, eta: (100 - job.progress) / perSecond };
}

function cancelButton(job, after) {
  if (!session.can('operator') || !OPEN.has(job.state) || job.cancel_requested) return null;
  return h('button', { type: 'button', class: 'secondary', 'data-action': 'cancel', onclick: async () => {
    const out = await confirmAndCall('Cancel job', `Cancel job #${job.id} (${job.kind})? A job a worker runs is asked to stop.`,
      `/v1/jobs/${job.id}/cancel`, { label: 'Cancel job' });
    if (out) after(out);
  } }, 'Cancel');
}

export async function render(view, [id]) {
  return id ? renderOne(view, Number(id)) : renderList(view);
}

async function renderList(view) {
  const jobs = await api('/v1/jobs?limit=500');
  const merge = (j) => { const i = jobs.findIndex((x) => x.id === j.id); if (i >= 0) Object.assign(jobs[i], j); else jobs.unshift(j); };
  const columns = [
    { key: 'id', label: 'Job', render: (j) => h('a', { href: `#/jobs/${j.id}` }, `#${j.id}`) },
    { key: 'kind', label: 'Kind', value: (j) => j.kind + (j.params?.kind ? ` (${j.params.kind})` : '') },
    { key: 'machine', label: 'Machine', render: (j) => (j.machine ? machineLink(j.machine) : (j.params?.plan ? `plan ${j.params.plan}` : '—')) },
    { key: 'state', label: 'State', render: (j) => [stateBadge(j.state), j.cancel_requested && OPEN.has(j.state) ? ' cancelling' : null] },
    { key: 'progress', label: 'Progress', render: (j) => progressBar(j.progress) },
    { key: 'rate', label: 'Rate', value: (j) => pace(j).rate, render: (j) => { const r = pace(j).rate; return r === null ? '—' : `${r.toFixed(1)} %/min`; } },
    { key: 'eta', label: 'ETA', value: (j) => pace(j).eta, render: (j) => fmtDuration(pace(j).eta) },
    { key: 'message', label: 'Message' },
    { key: 'created_at', label: 'Created', render: (j) => ago(j.created_at) },
    { key: 'act', label: '', value: () => null, render: (j) => cancelButton(j, (out) => { merge(out); table.update(jobs); }) },
  ];
  const table = dataTable(columns, jobs, { filter: true, id: 'jobs', empty: 'No jobs yet.' });
  clear(view, h('h1', {}, 'Jobs'), h('section', { class: 'card' }, table));
  const off = subscribe('job', (ev) => { merge(ev); table.update(jobs); });
  const tick = setInterval(() => table.update(jobs), 5000);    // ages and ETAs move on
  return () => { off(); clearInterval(tick); };
}

async function renderOne(view, id) {
  let job = await api(`/v1/jobs/${id}`);
  const head = h('dl', { class: 'kv', id: 'job-summary' });
  const log = h('pre', { class: 'log', id: 'job-log' });
  const buttons = h('div', { class: 'actions' });
  function draw() {
    const { rate, eta } = pace(job);
    clear(head,
      h('dt', {}, 'Kind'), h('dd', {}, job.kind + (job.params?.kind ? ` (${job.params.kind})` : '')),
      h('dt', {}, 'Machine'), h('dd', {}, job.machine ? machineLink(job.machine) : '—'),
      h('dt', {}, 'State'), h('dd', { id: 'job-state' }, stateBadge(job.state), job.cancel_requested && OPEN.has(job.state) ? ' (cancel requested)' : ''),
      h('dt', {}, 'Progress'), h('dd', { id: 'job-progress' }, progressBar(job.progress)),
      h('dt', {}, 'Rate / ETA'), h('dd', {}, rate === null ? '—' : `${rate.toFixed(1)} %/min, ${fmtDuration(eta)} left`),
      h('dt', {}, 'Message'), h('dd', { id: 'job-message' }, job.message || '—'),
      h('dt', {}, 'Worker'), h('dd', {}, job.claimed_by || '—'),
      h('dt', {}, 'Created'), h('dd', {}, `${fmtTime(job.created_at)} by ${job.created_by || 'the controller'}`),
      h('dt', {}, 'Started / finished'), h('dd', {}, `${fmtTime(job.started_at)} / ${fmtTime(job.finished_at)}`));
    clear(log, (job.log || []).map((l) => `${fmtTime(l.at)}  ${l.line}\n`));
    clear(buttons, cancelButton(job, (out) => { job = out; draw(); }));
  }
  clear(view, h('h1', {}, h('a', { href: '#/jobs' }, 'Jobs'), ` / #${id}`), section('Job', head, buttons), section('Log', log));
  draw();
  const off = subscribe('job', async (ev) => {
    if (ev.id !== id) return;
    Object.assign(job, ev);
    draw();
    try { job = await api(`/v1/jobs/${id}`); draw(); } catch { /* the event's fields are shown meanwhile */ }
  });
  return off;
}

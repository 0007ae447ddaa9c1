// Replicated items: every protected machine in a sortable, filterable table, kept current by the live stream.

import { api, ago, dataTable, fmtDuration, h, healthBadge, clear } from '../lib.js';
import { subscribe } from '../events.js';
import { machineLink, rpoTarget } from './common.js';
import { lastTestFailover } from './machine_data.js';

export async function render(view) {
  const [machines, policies, jobs] = await Promise.all([api('/v1/machines'), api('/v1/policies'), api('/v1/jobs')]);
  const byId = new Map(machines.map((x) => [x.id, x]));
  const rpo = (x) => {
    const target = rpoTarget(x, policies);
    const text = `${fmtDuration(x.rpo_seconds)} / ${target === null ? '—' : fmtDuration(target)}`;
    return h('span', { class: x.rpo_seconds !== null && target !== null && x.rpo_seconds > target ? 'breach' : null }, text);
  };
  const columns = [
    { key: 'name', label: 'Machine', render: (x) => machineLink(x.name) },
    { key: 'cloud', label: 'Cloud' },
    { key: 'health', label: 'Health', render: (x) => healthBadge(x.health) },
    { key: 'state', label: 'State', value: (x) => x.observed_state || x.desired_state },
    { key: 'rpo', label: 'RPO now / target', value: (x) => x.rpo_seconds, render: rpo },
    { key: 'last_success', label: 'Last success', value: (x) => x.last_success_at, render: (x) => ago(x.last_success_at) },
    { key: 'last_test', label: 'Last test failover', value: (x) => lastTestFailover(x.name, jobs)?.finished_at ?? null,
      render: (x) => { const j = lastTestFailover(x.name, jobs); return j ? ago(j.finished_at) : 'never'; } },
    { key: 'primary_host', label: 'Primary host' },
    { key: 'replica_host', label: 'Replica host' },
  ];
  const table = dataTable(columns, [...byId.values()], { filter: true, id: 'items', sortKey: 'name',
    empty: 'No machines are protected yet.' });
  clear(view, h('h1', {}, 'Replicated items'), h('section', { class: 'card' }, table));
  const off = subscribe('machine', (ev) => {
    const x = byId.get(ev.id);
    if (x) { Object.assign(x, ev); table.update([...byId.values()]); }
  });
  return off;
}

// Replicated items: every protected machine in a sortable, filterable table, kept current by the live stream.

import { api, ago, apiForm, dataTable, fmtBytes, fmtDuration, h, healthBadge, clear, notify, session } from '../lib.js';
import { subscribe } from '../events.js';
import { machineLink, rpoTarget } from './common.js';
import { lastTestFailover, reportedStats, succeededFailovers } from './machine_data.js';

/** The form that protects a machine (operator): POST /v1/machines, the API placing its replica. */
function enableForm(clouds, hosts, policies, after) {
  const primaries = clouds.filter((c) => c.pair && c.pair_role === 'primary');
  return apiForm({ id: 'enable-form', title: 'Protect a machine', submitLabel: 'Enable protection', fields: [
    { name: 'name', label: 'Machine' },
    { name: 'cloud', label: 'Primary cloud', type: 'select', options: primaries.map((c) => c.name) },
    { name: 'primary_host', label: 'Runs on host', type: 'select', options: [['', '(the cloud\'s only host)'], ...hosts.filter((x) => x.cloud && primaries.some((c) => c.name === x.cloud)).map((x) => x.hostname)] },
    { name: 'domain', label: 'libvirt domain', hint: 'or disks' },
    { name: 'disks', label: 'Disks', type: 'list', hint: 'VHDX paths, comma-separated' },
    { name: 'excluded', label: 'Excluded disks', type: 'list', hint: 'targets (vdb) or paths' },
    { name: 'policy', label: 'Policy', type: 'select', options: [['', '(the pair\'s)'], ...policies.map((p) => p.name)] }],
    onSubmit: async (v) => {
      const x = await api('/v1/machines', { method: 'POST', body: v });
      notify(`Protection of ${x.name} enabled`, 'ok');
      after(x);
    } });
}

export async function render(view) {
  const [machines, policies, jobs, observedList] = await Promise.all([
    api('/v1/machines'), api('/v1/policies'), succeededFailovers(), api('/v1/observed/machines')]);
  const observed = new Map(observedList.map((o) => [o.machine, o]));
  const stats = (x) => reportedStats(observed.get(x.name));
  const canEnable = session.can('operator');
  const [clouds, hosts] = canEnable ? await Promise.all([api('/v1/clouds'), api('/v1/hosts')]) : [[], []];
  const byId = new Map(machines.map((x) => [x.id, x]));
  const rpo = (x) => {
    const target = rpoTarget(x, policies);
    const text = `${fmtDuration(x.rpo_seconds)} / ${target === null ? '—' : fmtDuration(target)}`;
    return h('span', { class: x.rpo_seconds !== null && target !== null && x.rpo_seconds > target ? 'breach' : null }, text);
  };
  const columns = [
    { key: 'name', label: 'Machine', render: (x) => machineLink(x.name) },
    { key: 'cloud', label: 'Cloud' },
    { key: 'health', label: 'Health', render: (x) => {
      const badge = healthBadge(x.health);
      const why = stats(x).health_reasons || [];
      if (why.length) badge.title = why.join('; ');
      return badge;
    } },
    { key: 'state', label: 'State', value: (x) => x.observed_state || x.desired_state },
    { key: 'rpo', label: 'RPO now / target', value: (x) => x.rpo_seconds, render: rpo },
    { key: 'last_success', label: 'Last success', value: (x) => x.last_success_at, render: (x) => ago(x.last_success_at) },
    { key: 'pending', label: 'Pending', value: (x) => stats(x).pending_size ?? null, render: (x) => fmtBytes(stats(x).pending_size) },
    { key: 'last_test', label: 'Last test failover', value: (x) => lastTestFailover(x.name, jobs)?.finished_at ?? null,
      render: (x) => { const j = lastTestFailover(x.name, jobs); return j ? ago(j.finished_at) : 'never'; } },
    { key: 'primary_host', label: 'Primary host' },
    { key: 'replica_host', label: 'Replica host' },
    { key: 'extended', label: 'Extended', value: (x) => (x.extended ? `extended ${x.extended.health || 'Unknown'} ${x.extended.host || x.extended.cloud}` : null),
      render: (x) => {
        if (!x.extended) return '—';
        const e = x.extended;
        const badge = healthBadge(e.health);
        badge.title = `Extended replication to ${e.host || `cloud ${e.cloud}`}: ${e.state || 'not reported yet'}`;
        return h('span', { class: 'extended-mark' }, badge, ` ${e.host || e.cloud}`);
      } },
  ];
  const table = dataTable(columns, [...byId.values()], { filter: true, id: 'items', sortKey: 'name',
    empty: 'No machines are protected yet.' });
  const added = (x) => { byId.set(x.id, x); table.update([...byId.values()]); };
  clear(view, h('h1', {}, 'Replicated items'), h('section', { class: 'card' }, table),
    canEnable && h('section', { class: 'card' }, enableForm(clouds, hosts, policies, added)));
  const off = subscribe('machine', async (ev) => {
    byId.set(ev.id, Object.assign(byId.get(ev.id) || {}, ev));     // new machines appear too
    table.update([...byId.values()]);
    try {
      const [o] = await api(`/v1/observed/machines?machine=${encodeURIComponent(ev.name)}`);
      observed.set(ev.name, o);
      table.update([...byId.values()]);
    } catch { /* gone meanwhile */ }
  });
  const offRemoved = subscribe('machine_removed', (ev) => { byId.delete(ev.id); table.update([...byId.values()]); });
  return () => { off(); offRemoved(); };
}

// Recovery plans: their groups and actions, runs (test, planned, unplanned) started through the API and
// followed live, and the manual action a run waits on, confirmed from the page.

import { api, apiForm, clear, confirmAndCall, dataTable, fmtTime, h, healthBadge, notify, section, session,
         stateBadge } from '../lib.js';
import { subscribe } from '../events.js';
import { FORCE, machineLink } from './common.js';

const RUN_TEXT = {
  test: 'Start a test failover of every machine in the plan, group by group, on isolated networks. Replication goes on.',
  planned: 'Fail over every machine in the plan, group by group: primaries are shut down and send their last changes first (no data loss).',
  unplanned: 'Fail over every machine in the plan to the recovery site from the latest recovery points (the primary site is lost).',
};

/** Groups typed one per line: "web01, web02 | confirm: Check the load balancer" (a manual post-action). */
export function parseGroups(text) {
  return text.split('\n').map((l) => l.trim()).filter(Boolean).map((line) => {
    const [members, ...steps] = line.split('|');
    const group = { members: members.split(',').map((s) => s.trim()).filter(Boolean), pre: [], post: [] };
    for (const step of steps) {
      const m = step.trim().match(/^(pre\s+)?confirm:\s*(.+)$/i);
      if (!m) throw new Error(`"${step.trim()}": a step is "confirm: TEXT" (after the group) or "pre confirm: TEXT"`);
      (m[1] ? group.pre : group.post).push({ manual: m[2].trim() });
    }
    return group;
  });
}

export async function render(view, [name]) {
  return name ? renderOne(view, name) : renderList(view);
}

async function renderList(view) {
  async function draw() {
    const [plans, pairs] = await Promise.all([api('/v1/plans'), api('/v1/pairs')]);
    const last = await Promise.all(plans.map((p) => api(`/v1/plans/${encodeURIComponent(p.name)}/runs`).then((r) => r[0] || null)));
    const rows = plans.map((p, i) => ({ ...p, last: last[i] }));
    const table = dataTable([
      { key: 'name', label: 'Plan', render: (p) => h('a', { href: `#/plans/${encodeURIComponent(p.name)}` }, p.name) },
      { key: 'pair', label: 'Cloud pair' },
      { key: 'groups', label: 'Groups', value: (p) => p.groups.length },
      { key: 'machines', label: 'Machines', value: (p) => p.groups.reduce((n, g) => n + g.members.length, 0) },
      { key: 'last', label: 'Last run', value: (p) => p.last?.created_at ?? null,
        render: (p) => (p.last ? [`${p.last.kind} `, stateBadge(p.last.state), ` ${fmtTime(p.last.created_at)}`] : 'never') },
      { key: 'description', label: 'Description' },
    ], rows, { id: 'plans', empty: 'No recovery plans yet.' });
    const form = session.can('admin') && apiForm({ id: 'plan-form', title: 'New recovery plan', submitLabel: 'Create plan', fields: [
      { name: 'name', label: 'Name' },
      { name: 'pair', label: 'Cloud pair', type: 'select', options: pairs.map((p) => p.name) },
      { name: 'description', label: 'Description' },
      { name: 'groups', label: 'Groups, one per line', type: 'textarea', placeholder: 'db01\nweb01, web02 | confirm: Check the load balancer',
        hint: 'machines separated by commas; "| confirm: TEXT" adds a manual step after the group, "| pre confirm: TEXT" before it' }],
      onSubmit: async (v) => {
        await api('/v1/plans', { method: 'POST', body: { ...v, groups: parseGroups(v.groups || '') } });
        notify(`Plan ${v.name} created`, 'ok');
        await draw();
      } });
    clear(view, h('h1', {}, 'Recovery plans'), h('section', { class: 'card' }, table), form && h('section', { class: 'card' }, form));
  }
  await draw();
}

async function renderOne(view, name) {
  const base = `/v1/plans/${encodeURIComponent(name)}`;
  const [plan, machines] = await Promise.all([api(base), api('/v1/machines')]);
  let runs = await api(`${base}/runs`);
  const health = new Map(machines.map((x) => [x.name, x.health]));
  const actions = new Map(plan.groups.flatMap((g) => [...g.pre, ...g.post].map((a) => [a.id, { ...a, group: g.position }])));
  const runBox = h('div', { id: 'current-run' });
  const runsBox = h('div', { id: 'plan-runs' });

  const groups = section('Groups', plan.groups.map((g) => h('div', { class: 'card', 'data-group': g.position },
    h('h3', {}, `Group ${g.position}`),
    g.pre.map((a) => h('p', { class: 'muted' }, `before: ${a.manual ? `manual — ${a.manual}` : `script ${a.script.join(' ')}`}`)),
    h('ul', { class: 'plain' }, g.members.map((x) => h('li', {}, machineLink(x), ' ', healthBadge(health.get(x))))),
    g.post.map((a) => h('p', { class: 'muted' }, `after: ${a.manual ? `manual — ${a.manual}` : `script ${a.script.join(' ')}`}`)))));

  const starters = session.can('operator') && h('div', { class: 'actions', id: 'plan-actions' },
    ['test', 'planned', 'unplanned'].map((kind) => h('button', { type: 'button', class: kind === 'test' ? null : 'danger',
      'data-action': `run-${kind}`, onclick: async () => {
        const run = await confirmAndCall(`${kind[0].toUpperCase()}${kind.slice(1)} failover of ${name}`, RUN_TEXT[kind],
          `${base}/runs`, { body: { kind }, label: `Run ${kind} failover`, force: kind === 'unplanned' ? FORCE : undefined });
        if (run) { runs.unshift(run); drawRuns(); }
      } }, `Run ${kind} failover`)));

  function drawRuns() {
    const current = runs[0];
    clear(runBox);
    if (current) {
      const waiting = current.state === 'waiting_for_input' && current.waiting_action_id ? actions.get(current.waiting_action_id) : null;
      runBox.append(h('dl', { class: 'kv' },
        h('dt', {}, 'Run'), h('dd', {}, `#${current.id} ${current.kind} failover by ${current.created_by}`, current.forced ? ' (forced)' : ''),
        h('dt', {}, 'State'), h('dd', { id: 'run-state' }, stateBadge(current.state)),
        h('dt', {}, 'Group'), h('dd', { id: 'run-group' }, current.current_group ? `${current.current_group} of ${plan.groups.length}` : 'not started'),
        h('dt', {}, 'Job'), h('dd', {}, current.job ? h('a', { href: `#/jobs/${current.job}` }, `#${current.job}`) : '—')));
      if (waiting) {
        const note = h('input', { type: 'text', name: 'note', placeholder: 'note (optional)', maxlength: 500 });
        runBox.append(h('div', { class: 'card', id: 'waiting-action' },
          h('h3', {}, `Waiting for a manual action (group ${waiting.group})`), h('p', {}, waiting.manual || '(script)'),
          session.can('operator') && h('div', { class: 'actions' }, note, h('button', { type: 'button', 'data-action': 'confirm-action',
            onclick: async () => {
              const out = await confirmAndCall('Confirm manual action', `Confirm that this was done: ${waiting.manual}`,
                `/v1/plan-runs/${current.id}/confirm`, { body: { action_id: waiting.id, note: note.value }, label: 'Done' });
              if (out) { Object.assign(current, out); drawRuns(); }
            } }, 'Mark as done'))));
      }
    }
    clear(runsBox, dataTable([
      { key: 'id', label: 'Run', render: (r) => `#${r.id}` }, { key: 'kind', label: 'Kind' },
      { key: 'state', label: 'State', render: (r) => stateBadge(r.state) },
      { key: 'current_group', label: 'Group' }, { key: 'created_by', label: 'By' },
      { key: 'created_at', label: 'Started', render: (r) => fmtTime(r.created_at) },
      { key: 'finished_at', label: 'Finished', render: (r) => fmtTime(r.finished_at) },
      { key: 'confirmations', label: 'Confirmed steps', value: (r) => r.confirmations.length,
        render: (r) => r.confirmations.map((c) => `${c.by} ${fmtTime(c.at)}${c.note ? ` (${c.note})` : ''}`).join('; ') || '—' },
    ], runs, { id: 'runs-table', empty: 'This plan has not run yet.' }));
  }

  clear(view, h('h1', {}, h('a', { href: '#/plans' }, 'Recovery plans'), ` / ${name}`),
    section('Plan', h('p', {}, `Cloud pair ${plan.pair}. ${plan.description}`), starters),
    h('div', { class: 'grid' }, section('Current run', runBox), groups),
    section('Runs', runsBox));
  drawRuns();
  const off = subscribe('plan_run', (ev) => {
    if (ev.plan !== name) return;
    const i = runs.findIndex((r) => r.id === ev.id);
    if (i >= 0) runs[i] = ev; else runs = [ev, ...runs];
    drawRuns();
  });
  return off;
}

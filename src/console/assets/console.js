// The verigate operator console. Everything comes from the /v1 API with the operator's
// token; every value is put on the page as text (the page's CSP refuses HTML sinks).
'use strict';

(() => {
  const REFRESH_MS = 10000;
  const TOKEN_KEY = 'verigate.token';
  const SVG = 'http://www.w3.org/2000/svg';

  const session = { token: null, role: null };

  // Reads that walk many records run at most once a minute, or again when what they ask
  // changes; the rest refresh with the page.
  const slowReads = new Map();
  async function atMostEveryMinute(name, ask, nowMs, read) {
    const kept = slowReads.get(name);
    if (kept && kept.ask === ask && nowMs - kept.at < 60000) return kept.value;
    const value = await read();
    slowReads.set(name, { ask, at: nowMs, value });
    return value;
  }
  let refreshing = false;

  // ---- building the page, as text only ------------------------------------------------

  const $ = (id) => document.getElementById(id);

  // Null, undefined and false stand for "nothing here", so callers can write conditions
  // inline; everything else is a node, or a string that becomes a text node.
  const present = (v) => v !== null && v !== undefined && v !== false;
  const nodes = (children) => children.flat(Infinity).filter(present)
    .map((c) => (c instanceof Node ? c : String(c)));

  // h('td', {class: 'n'}, 'text', node, ...): an element whose strings become text nodes.
  const h = (tag, props, ...children) => build(document.createElement(tag), props, children);
  const svg = (tag, attrs, ...children) =>
    build(document.createElementNS(SVG, tag), attrs, children);

  function build(el, props, children) {
    for (const [key, value] of Object.entries(props || {})) {
      if (!present(value)) continue;
      if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? '' : String(value));
    }
    el.append(...nodes(children));
    return el;
  }

  const fill = (el, ...children) => el.replaceChildren(...nodes(children));

  const count = (n) => (typeof n === 'number' ? n.toLocaleString('en-US') : '–');
  const percent = (r) => (typeof r === 'number' ? (r * 100).toFixed(1) + ' %' : '–');

  function utc(iso) {
    if (!iso) return '–';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC').replace(/Z$/, ' UTC');
  }

  // A time as two unbreakable lines: the date, then the time of day.
  function when(iso) {
    if (!iso) return '–';
    const text = utc(iso);
    const [date, ...time] = text.split(' ');
    return h('span', { class: 'when' }, h('span', {}, date), h('br'), h('span', {}, time.join(' ')));
  }

  // Every cell of a table learns its column's heading, which a phone-width screen shows
  // beside the value (there the rows become cards).
  function labelled(table) {
    const headings = [...table.querySelectorAll('thead th')].map((th) => th.textContent);
    for (const row of table.querySelectorAll('tbody tr')) {
      [...row.children].forEach((cell, i) => cell.setAttribute('data-label', headings[i] || ''));
    }
    return table;
  }

  const METHODS = {
    sms: 'SMS', flashcall: 'flash call', callout: 'phone call', seamless: 'data (seamless)',
    whatsapp: 'WhatsApp',
  };

  function bytes(n) {
    if (typeof n !== 'number') return 'kept by the database server';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
  }

  function ago(iso, nowMs) {
    const ms = nowMs - new Date(iso).getTime();
    if (!Number.isFinite(ms)) return '';
    const min = Math.round(ms / 60000);
    if (min < 1) return 'just now';
    if (min < 120) return min + ' min ago';
    return Math.round(min / 60) + ' h ago';
  }

  function shortTime(iso) {
    return new Date(iso).toISOString().slice(11, 16);
  }

  const recordLink = (id) => h('a', { href: '#verification/' + encodeURIComponent(id) }, id);

  // ---- the API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options = {}) {
    const response = await fetch(path, {
      method: options.method || 'GET',
      headers: { Authorization: 'Bearer ' + (options.token || session.token), Accept: 'application/json' },
      cache: 'no-store',
      credentials: 'omit',
    });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const message = body && body.error && body.error.message
        ? body.error.message
        : 'HTTP ' + response.status;
      throw new ApiError(response.status, message);
    }
    return body;
  }

  const query = (params) => new URLSearchParams(params).toString();

  // ---- signing in ------------------------------------------------------------------------

  async function signIn(token) {
    const status = await api('/v1/status', { token });
    session.token = token;
    session.role = status.role;
    sessionStorage.setItem(TOKEN_KEY, token);
    showSignedIn();
  }

  function signOut(message) {
    session.token = null;
    session.role = null;
    slowReads.clear();
    sessionStorage.removeItem(TOKEN_KEY);
    $('app').hidden = true;
    $('nav').hidden = true;
    $('who').hidden = true;
    $('sign-out').hidden = true;
    $('sign-in').hidden = false;
    $('token').value = '';
    const error = $('sign-in-error');
    error.hidden = !message;
    error.textContent = message || '';
    document.body.dataset.role = '';
  }

  function showSignedIn() {
    $('sign-in').hidden = true;
    $('app').hidden = false;
    $('nav').hidden = false;
    $('sign-out').hidden = false;
    const who = $('who');
    who.hidden = false;
    who.textContent = session.role === 'admin' ? 'admin token' : 'read token';
    document.body.dataset.role = session.role;
    route();
  }

  const isAdmin = () => session.role === 'admin';

  // ---- views -----------------------------------------------------------------------------

  const views = {
    overview: { show: showOverview },
    blocks: { show: showBlocks },
    rules: { show: showRules },
    verification: { show: showVerification },
  };

  function current() {
    let hash = location.hash.replace(/^#/, '');
    try { hash = decodeURIComponent(hash); } catch (_) { /* a hand-typed %: keep it as typed */ }
    const [name, ...rest] = hash.split('/');
    return { name: views[name] ? name : 'overview', arg: rest.join('/') };
  }

  function route() {
    if (!session.token) return;
    const { name, arg } = current();
    for (const key of Object.keys(views)) $('view-' + key).hidden = key !== name;
    for (const link of document.querySelectorAll('#nav a')) {
      if (link.dataset.view === name) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    refresh(name, arg, true);
  }

  async function refresh(name, arg, first) {
    if (refreshing && !first) return;
    refreshing = true;
    try {
      await views[name].show(arg, first);
      banner(null);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        signOut('The token is no longer accepted: ' + err.message);
      } else {
        banner('Could not refresh: ' + err.message);
      }
    } finally {
      refreshing = false;
    }
  }

  function banner(message) {
    const el = $('banner');
    el.hidden = !message;
    el.textContent = message || '';
  }

  function stamp(id) {
    $(id).textContent = 'updated ' + new Date().toISOString().slice(11, 19) + ' UTC';
  }

  // ---- overview --------------------------------------------------------------------------

  async function showOverview() {
    const status = await api('/v1/status');
    const now = new Date(status.service.now).getTime();
    const minutes = Number($('window').value) || 180;
    const since = new Date(now - minutes * 60000).toISOString();
    const daySince = new Date(now - 24 * 3600000).toISOString();
    const bucket = minutes > 360 ? 'hour' : 'minute';
    // One pass over the window's records gives the totals, the series and the rules; the
    // 24-hour country pass is the costly one and is repeated once a minute.
    const [windowed, policy, blocks, flagged, countries] = await Promise.all([
      api('/v1/stats?' + query({ since, group_by: 'rule,' + bucket })),
      api('/v1/policy'),
      api('/v1/policy/blocks'),
      api('/v1/policy/flagged'),
      atMostEveryMinute('countries', '', now,
        () => api('/v1/stats?' + query({ since: daySince, group_by: 'country' }))),
    ]);
    const sum = summed(windowed.groups, () => 'all').get('all') || {};
    $('stat-verifications').textContent = count(sum.verifications || 0);
    $('stat-allowed').textContent = count(sum.allowed || 0);
    $('stat-denied').textContent = count(sum.denied || 0);
    $('stat-conversion').textContent = percent(sum.conversion_rate);
    $('stat-blocks').textContent = count(blocks.blocks.length);
    $('timeline-title').textContent = 'Verifications per ' + bucket + ', since ' + utc(since);
    timeline($('timeline'), summed(windowed.groups, (g) => g.group[bucket]), bucket,
      new Date(since).getTime(), now);
    topRules($('top-rules'), summed(windowed.groups, (g) => g.group.rule));
    countryChart($('countries'), countries.groups);
    flaggedKeys($('flagged'), flagged.flagged, now);
    facts($('facts'), status, policy);
    stamp('overview-updated');
  }

  // Stats groups added up by `key` of each group, with conversion worked out again.
  function summed(groups, key) {
    const out = new Map();
    for (const g of groups) {
      const k = key(g);
      const t = out.get(k) || { verifications: 0, allowed: 0, denied: 0, successful_allowed: 0 };
      for (const f of ['verifications', 'allowed', 'denied', 'successful_allowed']) t[f] += g[f];
      out.set(k, t);
    }
    for (const t of out.values()) t.conversion_rate = t.allowed ? t.successful_allowed / t.allowed : null;
    return out;
  }

  // Stacked bars, one per bucket, from the first bucket of the window to now.
  function timeline(box, byLabel, bucket, sinceMs, nowMs) {
    const step = bucket === 'hour' ? 3600000 : 60000;
    const start = Math.floor(sinceMs / step) * step;
    const n = Math.max(1, Math.ceil((nowMs - start) / step));
    const byTime = new Map([...byLabel].map(([label, g]) => [new Date(label).getTime(), g]));
    const buckets = [];
    for (let i = 0; i < n; i += 1) {
      const at = start + i * step;
      const g = byTime.get(at) || {};
      const allowed = g.allowed || 0;
      const denied = g.denied || 0;
      buckets.push({ at, allowed, denied, other: (g.verifications || 0) - allowed - denied });
    }
    const peak = Math.max(1, ...buckets.map((b) => b.allowed + b.denied + b.other));
    // Drawn at the box's own width, so text is not scaled with the bars.
    const width = Math.max(280, Math.round(box.clientWidth || 720));
    const height = 150;
    const barW = width / n;
    const chart = svg('svg', {
      viewBox: `0 0 ${width} ${height + 20}`, width, height: height + 20, class: 'timeline', role: 'img',
      'aria-label': 'verifications per ' + bucket,
    });
    buckets.forEach((b, i) => {
      let y = height;
      const group = svg('g', {}, svg('title', {},
        `${utc(new Date(b.at).toISOString())}: ${b.allowed} allowed, ${b.denied} denied` +
        (b.other ? `, ${b.other} without a decision` : '')));
      for (const [value, cls] of [[b.allowed, 'allow'], [b.denied, 'deny'], [b.other, 'none']]) {
        if (!value) continue;
        const barH = (value / peak) * height;
        y -= barH;
        group.append(svg('rect', {
          x: (i * barW).toFixed(2), y: y.toFixed(2),
          width: Math.max(barW - 0.5, 0.5).toFixed(2), height: barH.toFixed(2), class: cls,
        }));
      }
      chart.append(group);
    });
    chart.append(svg('line', { x1: 0, y1: height, x2: width, y2: height, class: 'axis' }));
    const ticks = width < 500 ? 3 : 6;
    for (let t = 0; t <= ticks; t += 1) {
      const i = Math.min(n - 1, Math.round((t * (n - 1)) / ticks));
      const x = Math.min(width - 20, Math.max(20, i * barW + barW / 2));
      chart.append(svg('text', { x: x.toFixed(1), y: height + 15, class: 'tick' },
        shortTime(new Date(buckets[i].at).toISOString())));
    }
    chart.append(svg('text', { x: 4, y: 12, class: 'tick peak' }, 'peak ' + peak));
    fill(box, chart);
  }

  function topRules(list, byRule) {
    const denying = [...byRule]
      .map(([rule, g]) => ({ rule, denied: g.denied }))
      .filter((g) => g.denied > 0)
      .sort((a, b) => b.denied - a.denied || a.rule.localeCompare(b.rule))
      .slice(0, 8);
    if (!denying.length) {
      fill(list, h('li', { class: 'empty' }, 'Nothing denied in this window.'));
      return;
    }
    const peak = denying[0].denied;
    fill(list, denying.map((g) => h('li', {},
      h('span', { class: 'bar-label' }, g.rule),
      meter(g.denied / peak, 'deny'),
      h('span', { class: 'n' }, count(g.denied)))));
  }

  // Keys shadow rules would deny, most recent first.
  function flaggedKeys(box, flagged, now) {
    if (!flagged.length) {
      fill(box, h('p', { class: 'empty' }, 'No shadow rule matched a key in the last hour.'));
      return;
    }
    fill(box, h('div', { class: 'table-wrap' }, labelled(h('table', { class: 'flagged cards' },
      h('thead', {}, h('tr', {},
        ['Key', 'Rule', 'Would', 'Since', 'Last', 'Matches', 'Reading'].map((t) => h('th', {}, t)))),
      h('tbody', {}, flagged.slice(0, 20).map((f) => h('tr', { 'data-key': f.key, 'data-rule': f.rule },
        h('td', { class: 'key' }, f.key),
        h('td', { class: 'rule' }, f.rule),
        h('td', { class: f.would }, f.would),
        h('td', {}, when(f.since), h('br'), h('small', {}, ago(f.since, now))),
        h('td', {}, ago(f.last, now)),
        h('td', { class: 'n' }, count(f.matches)),
        h('td', { class: 'reason' }, f.reading))))))));
  }

  // A horizontal bar; its width is set through the CSSOM, which the CSP allows.
  function meter(fraction, cls) {
    const inner = h('span', { class: 'meter-fill ' + cls });
    inner.style.width = Math.max(0, Math.min(1, fraction)) * 100 + '%';
    return h('span', { class: 'meter' }, inner);
  }

  function countryChart(box, groups) {
    const rows = groups
      .filter((g) => g.allowed > 0)
      .sort((a, b) => b.allowed - a.allowed)
      .slice(0, 12);
    if (!rows.length) {
      fill(box, h('p', { class: 'empty' }, 'No allowed verifications in the last 24 hours.'));
      return;
    }
    const allowed = rows.reduce((s, g) => s + g.allowed, 0);
    const successful = rows.reduce((s, g) => s + g.successful_allowed, 0);
    const overall = allowed ? successful / allowed : 0;
    fill(box, h('table', { class: 'countries' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Country'), h('th', {}, 'Conversion'),
        h('th', { class: 'n' }, 'Allowed'))),
      h('tbody', {}, rows.map((g) => {
        const low = g.conversion_rate !== null && g.conversion_rate < overall * 0.6;
        return h('tr', { class: low ? 'low' : null, 'data-country': g.group.country },
          h('td', {}, g.group.country),
          h('td', {}, h('span', { class: 'meter-cell' },
            meter(g.conversion_rate || 0, low ? 'deny' : 'allow'),
            h('span', { class: 'n' }, percent(g.conversion_rate)))),
          h('td', { class: 'n' }, count(g.allowed)));
      }))));
  }

  function facts(dl, status, policy) {
    const items = [
      ['Policy version', policy.version],
      ['Policy loaded', utc(policy.loaded_at)],
      ['Policy file', policy.path || 'built in'],
      ['Default answer', `${policy.default} (on error: ${policy.on_error})`],
      ['Store', status.store.ready ? 'ready' : 'not ready: ' + status.store.problem],
      ['Store size', bytes(status.store.size_bytes)],
      ['Disk free', typeof status.store.disk_free_bytes === 'number'
        ? bytes(status.store.disk_free_bytes) : '–'],
      ['Signed in with', session.role === 'admin' ? 'the admin token' : 'the read token'],
    ];
    const children = items.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]);
    children.push(h('dt', {}, 'Last reload error'));
    children.push(policy.last_reload_error
      ? h('dd', {}, h('pre', { class: 'error', id: 'reload-error' }, policy.last_reload_error))
      : h('dd', { id: 'reload-error' }, 'none'));
    fill(dl, children);
  }

  // ---- blocks ----------------------------------------------------------------------------

  async function showBlocks() {
    const [status, listed] = await Promise.all([api('/v1/status'), api('/v1/policy/blocks')]);
    const now = new Date(status.service.now).getTime();
    const box = $('blocks-list');
    if (!listed.blocks.length) {
      fill(box, h('p', { class: 'empty' }, 'No key is in quarantine.'));
      stamp('blocks-updated');
      return;
    }
    fill(box, h('div', { class: 'table-wrap' }, labelled(h('table', { class: 'blocks cards' },
      // Actions come second, so they stay in view however wide the evidence is.
      h('thead', {}, h('tr', {},
        ['Key', isAdmin() ? 'Actions' : null, 'Rule', 'Since', 'Until', 'Strikes',
          'Blocked requests', 'Probes', 'Why', 'Evidence']
          .filter(Boolean).map((t) => h('th', {}, t)))),
      h('tbody', {}, listed.blocks.map((b) => blockRow(b, now)))))));
    stamp('blocks-updated');
  }

  function blockRow(block, now) {
    const evidence = h('ul', { class: 'evidence' }, block.evidence.map((e) => h('li', {},
      recordLink(e.id), ' ', h('span', { class: 'masked' }, e.number), ' ',
      h('span', { class: 'status' }, e.outcome))));
    const actions = isAdmin()
      ? h('td', { class: 'actions' },
        h('button', { type: 'button', class: 'danger lift', onclick: () => lift(block) }, 'Lift'),
        block.until
          ? h('button', { type: 'button', class: 'quiet pin', onclick: () => pin(block) }, 'Pin')
          : null)
      : null;
    return h('tr', { 'data-key': block.key, 'data-rule': block.rule },
      h('td', { class: 'key' }, block.key),
      actions,
      h('td', { class: 'rule' }, block.rule),
      h('td', {}, when(block.since), h('br'), h('small', {}, ago(block.since, now))),
      h('td', {}, block.until ? when(block.until) : h('strong', {}, 'pinned')),
      h('td', { class: 'n' }, block.strikes),
      h('td', { class: 'n' }, count(block.requests)),
      h('td', { class: 'n' }, count(block.probes)),
      h('td', { class: 'reason' }, block.reason),
      h('td', {}, evidence));
  }

  async function lift(block) {
    const ok = await confirmAction('Lift this block?',
      `Requests from ${block.key} will be decided by the rules again, and what tripped ` +
      `${block.rule} is forgotten.`, 'Lift');
    if (ok) await change('DELETE', block.key, '', 'Lifted the block on ' + block.key);
  }

  async function pin(block) {
    const ok = await confirmAction('Pin this block?',
      `${block.key} stays blocked by ${block.rule} until someone lifts it.`, 'Pin');
    if (ok) await change('POST', block.key, '/pin', 'Pinned the block on ' + block.key);
  }

  async function change(method, key, suffix, done) {
    try {
      await api('/v1/policy/blocks/' + encodeURIComponent(key) + suffix, { method });
      await showBlocks();
      banner(null);
      notice(done);
    } catch (err) {
      banner('Not changed: ' + err.message);
    }
  }

  function notice(message) {
    const el = h('p', { class: 'notice', role: 'status' }, message);
    $('blocks-list').prepend(el);
    setTimeout(() => el.remove(), 6000);
  }

  function confirmAction(title, text, action) {
    const dialog = $('confirm');
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-ok').textContent = action;
    return new Promise((resolve) => {
      const done = (answer) => {
        $('confirm-ok').onclick = null;
        $('confirm-cancel').onclick = null;
        dialog.onclose = null;
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      $('confirm-ok').onclick = () => done(true);
      $('confirm-cancel').onclick = () => done(false);
      dialog.onclose = () => done(false);
      dialog.showModal();
    });
  }

  // ---- rules -----------------------------------------------------------------------------

  async function showRules() {
    const [status, policy] = await Promise.all([api('/v1/status'), api('/v1/policy')]);
    const now = new Date(status.service.now).getTime();
    const hours = Number($('rules-period').value) || 24;
    // The stored outcomes walk every record of the period.
    const stored = await atMostEveryMinute('rules', hours, now, () =>
      api('/v1/stats/rules?' + query({ since: new Date(now - hours * 3600000).toISOString() })));
    const byRule = new Map(stored.rules.map((r) => [r.rule, r]));
    const period = hours === 24 ? '24 h' : `${hours / 24} days`;
    $('rules-hint').textContent =
      `Policy ${policy.version}, loaded ${utc(policy.loaded_at)}. Hits count since then; ` +
      `decisions and outcomes are the stored verifications of the last ${period}. For a ` +
      'shadow rule, the outcomes are how the verifications it would have decided ended, and ' +
      'its precision is the share of those it would have denied that did not succeed: the ' +
      'ones that succeeded are real users it would have turned away.';
    const builtins = ['default', 'on_error'].filter((name) => byRule.has(name));
    fill($('rules-list'), h('div', { class: 'table-wrap' }, labelled(h('table', { class: 'rules cards' },
      h('thead', {}, h('tr', {}, ['Rule', 'Mode', 'Conditions', 'Hits', `Decided (${period})`,
        `Outcomes (${period})`, 'Precision'].map((t) => h('th', {}, t)))),
      h('tbody', {}, policy.rules.map((rule) => ruleRow(rule, byRule.get(rule.name))),
        builtins.map((name) => builtinRow(name, byRule.get(name))))))));
    stamp('rules-updated');
  }

  function outcomeList(results) {
    const entries = Object.entries(results || {}).sort((a, b) => b[1] - a[1]);
    if (!entries.length) return h('span', { class: 'empty' }, 'none yet');
    return h('ul', { class: 'outcomes' }, entries.map(([s, n]) =>
      h('li', { class: 'status-' + s.toLowerCase() }, `${s} ${count(n)}`)));
  }

  const decidedText = (d) => (d && d.verifications
    ? `${count(d.allowed)} allowed, ${count(d.denied)} denied` : '–');

  function ruleRow(rule, stored) {
    const shadow = rule.mode === 'shadow';
    const s = stored && stored.shadow;
    let precision = h('span', { class: 'empty' }, '–');
    if (shadow && rule.action === 'deny') {
      precision = s && s.precision !== null
        ? [h('strong', {}, percent(s.precision)), h('br'),
          h('small', {}, `${count(s.would_deny_successful)} of ${count(s.would_deny_finished)} ` +
            'finished would have been real users turned away')]
        : h('span', { class: 'empty' }, 'no finished outcomes yet');
    }
    const results = shadow ? s && s.results : stored && stored.decided.results;
    return h('tr', { 'data-rule': rule.name, class: shadow ? 'shadow' : null },
      h('td', {}, h('strong', {}, rule.name), rule.note ? [h('br'), h('small', {}, rule.note)] : null),
      h('td', {}, h('span', { class: 'mode ' + rule.mode }, rule.mode), ' ', rule.action),
      h('td', {}, h('ul', { class: 'conditions' }, rule.conditions.map((c) => h('li', {}, c)))),
      h('td', { class: 'n' }, count(rule.hits), rule.spared
        ? [h('br'), h('small', { class: 'spared' }, `spared ${count(rule.spared)} returning`)]
        : null),
      h('td', { class: 'n' }, shadow
        ? (s && s.verifications ? `would have decided ${count(s.verifications)}` : '–')
        : decidedText(stored && stored.decided)),
      h('td', {}, outcomeList(results)),
      h('td', { class: 'precision' }, precision));
  }

  function builtinRow(name, stored) {
    return h('tr', { 'data-rule': name, class: 'builtin' },
      h('td', {}, h('em', {}, name === 'default' ? 'policy default' : 'on_error answer')),
      h('td', {}, '–'), h('td', {}, '–'), h('td', { class: 'n' }, '–'),
      h('td', { class: 'n' }, decidedText(stored.decided)),
      h('td', {}, outcomeList(stored.decided.results)), h('td', {}, '–'));
  }

  // ---- verification ----------------------------------------------------------------------

  async function showVerification(arg, first) {
    if (!first) {
      // Only a shown record refreshes; a result list stays as searched.
      if (arg) await showRecord(arg);
      return;
    }
    if (arg) {
      fill($('search-results'));
      await showRecord(arg);
    } else {
      fill($('record'));
      await latest();
    }
  }

  // The newest verifications, so the view is useful before anything is searched. The list
  // endpoint pages oldest first, so a busy quarter of an hour narrows to the last minute.
  async function latest() {
    const status = await api('/v1/status');
    const now = new Date(status.service.now).getTime();
    for (const minutes of [15, 1]) {
      const since = new Date(now - minutes * 60000).toISOString();
      const page = await api('/v1/verifications?' + query({ since, limit: 1000 }));
      if (!page.next_cursor || minutes === 1) {
        const items = page.items.slice(-25);
        const heading = `Latest verifications (last ${minutes === 1 ? 'minute' : '15 minutes'})`;
        if (items.length) listResults(items, heading);
        else fill($('search-results'), h('p', { class: 'empty' }, 'No verification in the last 15 minutes.'));
        return;
      }
    }
  }

  async function search(kind, text) {
    const value = text.trim();
    if (!value) return;
    fill($('record'));
    let items = [];
    let by = kind;
    if (kind === 'auto') {
      by = /^\+?[0-9][0-9 ]{5,}$/.test(value) ? 'number' : 'id';
    }
    if (by === 'id') {
      try {
        items = [await api('/v1/verifications/' + encodeURIComponent(value))];
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 404)) throw err;
        if (kind === 'auto') by = 'reference';
      }
    }
    if (by === 'number' || by === 'reference') {
      const v = by === 'number' ? value.replace(/ /g, '') : value;
      const number = by === 'number' && !v.startsWith('+') ? '+' + v : v;
      const page = await api('/v1/verifications?' + query({ [by]: number, limit: 100 }));
      items = page.items;
    }
    results(items, by, value);
  }

  function results(items, by, value) {
    const box = $('search-results');
    if (!items.length) {
      fill(box, h('p', { class: 'empty' }, `No verification with ${by} “${value}”.`));
      return;
    }
    if (items.length === 1) {
      fill(box);
      const hash = '#verification/' + encodeURIComponent(items[0].id);
      if (location.hash === hash) showRecord(items[0].id);
      else location.hash = hash;
      return;
    }
    listResults(items, `${items.length} verifications with ${by} “${value}”` +
      (items.length === 100 ? ' (the oldest 100)' : ''));
  }

  function listResults(items, heading) {
    fill($('search-results'), h('h2', {}, heading), h('div', { class: 'table-wrap' }, labelled(h('table', { class: 'results cards' },
      h('thead', {}, h('tr', {}, ['First seen', 'Id', 'Number', 'Method', 'Reference',
        'Answer', 'Status'].map((t) => h('th', {}, t)))),
      h('tbody', {}, items.slice().reverse().map((r) => h('tr', {},
        h('td', {}, when(r.first_seen)), h('td', {}, recordLink(r.id)),
        h('td', {}, r.number || '–'), h('td', {}, METHODS[r.method] || r.method || '–'),
        h('td', { class: 'reference' }, r.reference || '–'),
        h('td', {}, r.decision ? r.decision.action : '–'),
        h('td', {}, r.result ? r.result.status : '–'))))))));
  }

  async function showRecord(id) {
    const path = '/v1/verifications/' + encodeURIComponent(id);
    let record;
    let logged;
    try {
      [record, logged] = await Promise.all([
        api(path),
        // Without its log entries the record still tells the story, from its own parts.
        api(path + '/events').catch(() => null),
      ]);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        fill($('record'), h('p', { class: 'empty' }, `No verification with id “${id}”.`));
        return;
      }
      throw err;
    }
    fill($('record'), recordView(record, logged));
  }

  function recordView(r, logged) {
    const facts = [
      ['Id', r.id], ['Number', r.number || '–'], ['Country', r.country || 'unknown'],
      ['Prefix', r.prefix || '–'], ['Method', METHODS[r.method] || r.method || '–'],
      ['Reference', r.reference || '–'], ['Custom', r.custom || '–'],
      ['Sinch app', r.app_key], ['First seen', utc(r.first_seen)],
      ['Events accepted', r.event_count],
    ];
    return h('article', { class: 'card record', 'data-id': r.id },
      h('h2', {}, 'Verification ', h('code', {}, r.id)),
      h('p', { class: 'story' }, story(r)),
      h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k),
        h('dd', { class: 'field-' + k.toLowerCase().replace(/ /g, '-') }, v)])),
      h('h3', {}, 'Events'),
      h('ol', { class: 'events' }, events(r, logged)),
      r.decision ? decisionView(r.decision) : null);
  }

  // The record in one sentence an operator reads first.
  function story(r) {
    const parts = [];
    const number = r.number ? ` for ${r.number}` : '';
    const method = METHODS[r.method] || r.method;
    parts.push(`${method ? 'A verification by ' + method : 'A verification'}${number}` +
      (r.country ? ` (${r.country})` : '') + ` first seen ${utc(r.first_seen)}.`);
    if (r.decision) {
      const by = r.decision.on_error
        ? 'because the policy failed (its on_error answer)'
        : r.decision.rule ? `by rule ${r.decision.rule}` : 'by the policy default';
      parts.push(`verigate answered ${r.decision.action} ${by}.`);
    } else if (!r.request) {
      parts.push('No request event was received, so verigate took no decision.');
    }
    if (r.result) {
      parts.push(`It ended ${r.result.status}` + (r.result.reason ? ` (${r.result.reason})` : '') + '.');
    } else {
      parts.push('No result yet.');
    }
    return parts.join(' ');
  }

  // The verification in time order: each callback as received (from the event log, with
  // its body) and the answer verigate gave; without the log, the record's own parts.
  function events(r, logged) {
    const list = [];
    if (logged && logged.events.length) {
      for (const e of logged.events) list.push([e.received_at, describe(e.event, e.body), e.body]);
    } else {
      if (r.request) list.push([r.request.received_at, describe('VerificationRequestEvent', r.request)]);
      if (r.sms_delivery) {
        list.push([r.sms_delivery.received_at, describe('VerificationSmsDeliveredEvent',
          { smsResult: r.sms_delivery.result })]);
      }
      if (r.result) list.push([r.result.received_at, describe('VerificationResultEvent', r.result)]);
    }
    // After the events, so that it follows a request received in the same millisecond.
    if (r.decision) {
      list.push([r.decision.decided_at, `Answered ${r.decision.action}: ${r.decision.reason}`]);
    }
    const ms = (iso) => new Date(iso).getTime() || 0;
    list.sort((a, b) => ms(a[0]) - ms(b[0]));
    const items = list.map(([at, what, body]) => h('li', {}, h('time', {}, utc(at)), ' ', what,
      body ? h('details', {}, h('summary', {}, 'as received'),
        h('pre', { class: 'body' }, JSON.stringify(body, null, 2))) : null));
    if (logged && !logged.complete) {
      items.push(h('li', { class: 'empty' }, `${logged.events.length} of the ${logged.event_count} ` +
        'callbacks were found in the log near this verification; the facts above include them all.'));
    }
    return items;
  }

  // One callback in words, from its body (or the record's part of the same shape).
  function describe(type, body) {
    const b = body || {};
    if (type === 'VerificationRequestEvent') {
      const p = b.price;
      const currency = p && (p.currencyId || p.currency_id);
      return 'Request received' + (p && p.amount !== undefined ? `, price ${p.amount} ${currency || ''}` : '');
    }
    if (type === 'VerificationResultEvent') {
      const extra = [b.reason, b.source && 'source ' + b.source].filter(Boolean).join(', ');
      return `Result ${b.status}` + (extra ? ` (${extra})` : '');
    }
    if (type === 'VerificationSmsDeliveredEvent') return `SMS delivery reported: ${b.smsResult}`;
    return type;
  }

  function decisionView(d) {
    const e = d.explanation || {};
    const lines = [];
    lines.push(d.on_error
      ? `The policy could not decide in time or failed, so its on_error answer (${d.action}) was given.`
      : d.rule ? `Rule ${d.rule} decided ${d.action}: ${d.reason}.`
        : `No rule matched; the policy default (${d.action}) applied: ${d.reason}.`);
    if (e.country) lines.push(`The number belongs to ${e.country}.`);
    if (e.matched_prefix) lines.push(`It matched the prefix ${e.matched_prefix}.`);
    for (const c of e.counters || []) {
      lines.push(`${c.rule}: ${c.condition} on ${c.key} read ${round(c.value)} against a limit of ${round(c.max)}.`);
    }
    if (e.quarantine) {
      const q = e.quarantine;
      const until = q.until ? `until ${utc(q.until)}` : 'pinned';
      const state = { blocked: 'was already in quarantine', tripped: 'tripped this request into quarantine', probe: 'is in quarantine; this request went through as a probe' }[q.state] || q.state;
      lines.push(`Key ${q.key} ${state} by ${q.rule} (${until}).`);
    }
    for (const s of e.shadow || []) {
      lines.push(`Shadow rule ${s.rule} would have answered ${s.would}.`);
    }
    if (e.eval_ns) lines.push(`Decided in ${(e.eval_ns / 1000).toFixed(1)} µs with policy ${d.policy_version}.`);
    return h('section', { class: 'decision' },
      h('h3', {}, 'Decision'),
      h('ul', { class: 'explanation' }, lines.map((l) => h('li', {}, l))),
      h('details', {}, h('summary', {}, 'The answer sent to Sinch'),
        h('pre', {}, JSON.stringify(d.answer, null, 2))));
  }

  const round = (v) => (Number.isInteger(v) ? String(v) : Number(v).toFixed(3));

  // ---- wiring ----------------------------------------------------------------------------

  function start() {
    $('sign-in-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const token = $('token').value.trim();
      const error = $('sign-in-error');
      error.hidden = true;
      $('sign-in-button').disabled = true;
      try {
        await signIn(token);
      } catch (err) {
        error.hidden = false;
        error.textContent = err instanceof ApiError && (err.status === 401 || err.status === 403)
          ? 'That token was refused: ' + err.message
          : 'Could not sign in: ' + err.message;
      } finally {
        $('sign-in-button').disabled = false;
      }
    });
    $('sign-out').addEventListener('click', () => signOut(null));
    $('window').addEventListener('change', () => refresh('overview', '', true));
    $('rules-period').addEventListener('change', () => refresh('rules', '', true));
    $('search-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      try {
        await search($('search-kind').value, $('search-text').value);
        banner(null);
      } catch (err) {
        banner('Search failed: ' + err.message);
      }
    });
    window.addEventListener('hashchange', route);
    setInterval(() => {
      if (!session.token || document.hidden || $('confirm').open) return;
      const { name, arg } = current();
      refresh(name, arg, false);
    }, REFRESH_MS);

    // A reload keeps the tab's session. A refused token is forgotten; a service that does
    // not answer (restarting, say) is asked again, keeping the token meanwhile.
    const saved = sessionStorage.getItem(TOKEN_KEY);
    const resume = () => !session.token && signIn(saved).catch((err) => {
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
        signOut('The saved token is no longer accepted: ' + err.message);
        return;
      }
      signOut('verigate is not answering (' + err.message + '); trying again in 5 seconds.');
      sessionStorage.setItem(TOKEN_KEY, saved);
      setTimeout(resume, 5000);
    });
    if (saved) resume();
    else signOut(null);
  }

  start();
})();

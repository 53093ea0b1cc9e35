// The demo page herald serves at `/` in development mode (no secrets
// configured): herald-client in a browser, against the development-only routes
// `/dev/bootstrap` (a fresh token for demo-user, and the demo ids) and
// `/dev/publish-demo` (publishes one demo event). Plain DOM, and a TanStack
// Query cache (query-core, no framework) that herald-client/tanstack keeps
// fresh.
//
// Built by `npm run build:demo` (client/demo/build.mjs) into assets/demo/,
// which herald embeds.

import { QueryClient, QueryObserver, type QueryKey } from "@tanstack/query-core";

import { createHeraldClient, type AnyHeraldEvent, type ConnectionStatus, type ResyncInfo } from "../src/index.js";
import { createQueryInvalidator, heraldQueryKeys } from "../src/tanstack.js";

interface Bootstrap {
  token: string;
  userId: string;
  campaignId: string;
  settlementId: string;
  structureId: string;
}

const MAX_EVENTS = 200;
const MAX_LOG = 50;

function $(id: string): HTMLElement {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} is missing from the page`);
  return el;
}

const statusEl = $("status");
const whoEl = $("who");
const eventsEl = $("events");
const emptyEl = $("empty");
const countEl = $("count");
const logEl = $("log");
const publishButton = $("publish") as HTMLButtonElement;
const typeSelect = $("type") as HTMLSelectElement;
const publishResult = $("publish-result");
const publishError = $("publish-error");

function el<K extends keyof HTMLElementTagNameMap>(tag: K, className: string, text: string): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.textContent = text;
  return node;
}

function time(date = new Date()): string {
  return date.toLocaleTimeString([], { hour12: false });
}

function log(text: string, isError = false): void {
  const li = el("li", isError ? "error" : "", `${time()}  ${text}`);
  logEl.prepend(li);
  while (logEl.children.length > MAX_LOG) logEl.lastElementChild?.remove();
}

function showStatus(status: ConnectionStatus): void {
  statusEl.textContent = status;
  statusEl.dataset.status = status;
}

async function getBootstrap(): Promise<Bootstrap> {
  const res = await fetch("/dev/bootstrap", { cache: "no-store" });
  if (!res.ok) throw new Error(`/dev/bootstrap answered ${res.status}`);
  return (await res.json()) as Bootstrap;
}

function short(value: unknown, max = 80): string {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/** A one-line, human summary of an event's payload. */
function summarize(event: AnyHeraldEvent): string {
  switch (event.type) {
    case "entity_updated": {
      const p = event.payload;
      const parts = [`${p.entityType} ${p.entityId}`];
      if (p.changedFields?.length) parts.push(`changed ${p.changedFields.join(", ")}`);
      if (p.entityData) parts.push(short(p.entityData));
      return parts.join(" · ");
    }
    case "state_invalidated": {
      const p = event.payload;
      const parts = [`scope ${p.scope}`];
      if (p.entityIds?.length) parts.push(`entities ${p.entityIds.join(", ")}`);
      if (p.reason) parts.push(`reason: ${p.reason}`);
      return parts.join(" · ");
    }
    case "world_time_changed": {
      const p = event.payload;
      const parts = [`${p.previousTime ?? "(none)"} → ${p.newTime}`];
      if (p.elapsed !== undefined) parts.push(`elapsed ${p.elapsed}`);
      return parts.join(" · ");
    }
    case "settlement_updated": {
      const p = event.payload;
      const parts = [`settlement ${p.settlementId} ${p.operation}`];
      if (p.changes) parts.push(short(p.changes));
      return parts.join(" · ");
    }
    case "structure_updated": {
      const p = event.payload;
      const parts = [`structure ${p.structureId} (settlement ${p.settlementId}) ${p.operation}`];
      if (p.changes) parts.push(short(p.changes));
      return parts.join(" · ");
    }
    default:
      return short((event as { payload?: unknown }).payload);
  }
}

let received = 0;

function showEvent(event: AnyHeraldEvent): void {
  const li = document.createElement("li");
  li.dataset.offset = event.offset;
  li.dataset.type = event.type;
  li.append(el("span", "type", event.type), el("span", "summary", summarize(event)));
  const source = event.metadata?.source ? ` · from ${event.metadata.source}` : "";
  li.append(el("span", "meta mono", `offset ${event.offset} · ${event.timestamp}${source}`));
  eventsEl.prepend(li);
  while (eventsEl.children.length > MAX_EVENTS) eventsEl.lastElementChild?.remove();
  received += 1;
  countEl.textContent = String(received);
  emptyEl.hidden = true;
}

function showResync(info: ResyncInfo): void {
  let marker = document.getElementById("resync");
  if (!marker) {
    marker = el("p", "", "");
    marker.id = "resync";
    marker.setAttribute("role", "status");
    eventsEl.before(marker);
  }
  const why = info.reason === "not-recovered" ? "herald could not replay what was missed" : "no event seen before the drop";
  marker.textContent = `${time()}: resync of ${info.kind} ${info.id} (${why}); the query cache refetches the campaign's queries.`;
  marker.dataset.reason = info.reason;
  log(`onResync: ${info.kind} ${info.id}, ${info.reason}`);
}

/**
 * A query whose function is local (standing in for an API call) and counts
 * its calls; `show` renders each result into `el`.
 */
function observeQuery<T>(
  queryClient: QueryClient,
  queryKey: QueryKey,
  fetchData: (fetches: number) => T,
  show: (data: T, el: HTMLElement) => void,
  el: HTMLElement,
): void {
  let fetches = 0;
  const observer = new QueryObserver(queryClient, {
    queryKey,
    queryFn: () => {
      fetches += 1;
      return fetchData(fetches);
    },
  });
  observer.subscribe((result) => {
    if (result.data !== undefined) show(result.data, el);
  });
}

interface CampaignData {
  name: string;
  fetches: number;
  fetchedAt: string;
}

interface SummaryData {
  fetches: number;
  fetchedAt: string;
  eventsReceived: number;
}

function showQueries(queryClient: QueryClient, campaignId: string): void {
  const campaignKey = heraldQueryKeys.campaign(campaignId);
  observeQuery<CampaignData>(
    queryClient,
    campaignKey,
    (fetches) => ({ name: "(local stand-in)", fetches, fetchedAt: time() }),
    (data, node) => {
      node.dataset.fetches = String(data.fetches);
      node.dataset.name = data.name;
      node.textContent = `${JSON.stringify(campaignKey)} · name "${data.name}" · fetched ${data.fetches}× (last ${data.fetchedAt})`;
    },
    $("q-campaign"),
  );
  const summaryKey = [...campaignKey, "summary"];
  observeQuery<SummaryData>(
    queryClient,
    summaryKey,
    (fetches) => ({ fetches, fetchedAt: time(), eventsReceived: received }),
    (data, node) => {
      node.dataset.fetches = String(data.fetches);
      node.textContent = `${JSON.stringify(summaryKey)} · fetched ${data.fetches}× (last ${data.fetchedAt}, after ${data.eventsReceived} events)`;
    },
    $("q-summary"),
  );
}

async function publish(): Promise<void> {
  publishButton.disabled = true;
  publishError.hidden = true;
  publishResult.textContent = "publishing…";
  const type = typeSelect.value;
  try {
    const res = await fetch("/dev/publish-demo", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ type }),
    });
    const text = await res.text();
    if (res.status !== 202) throw new Error(`POST /dev/publish-demo answered ${res.status}: ${text || res.statusText}`);
    const body = JSON.parse(text) as { accepted?: number; offset?: string };
    publishResult.textContent = `published ${type}${body.offset ? ` at offset ${body.offset}` : ""}`;
  } catch (err) {
    publishResult.textContent = "";
    publishError.textContent = err instanceof Error ? err.message : String(err);
    publishError.hidden = false;
  } finally {
    publishButton.disabled = false;
  }
}

async function main(): Promise<void> {
  showStatus("connecting");
  publishButton.addEventListener("click", () => void publish());

  let boot: Bootstrap | undefined;
  for (let attempt = 1; !boot; attempt += 1) {
    try {
      boot = await getBootstrap();
    } catch (err) {
      log(`bootstrap failed (${err instanceof Error ? err.message : String(err)}); retrying`, true);
      await new Promise((r) => setTimeout(r, Math.min(10_000, 500 * 2 ** attempt)));
    }
  }
  const ids = boot;
  whoEl.textContent = "";
  whoEl.append(
    "Signed in as ",
    el("code", "", ids.userId),
    ", subscribed to campaign ",
    el("code", "", ids.campaignId),
    ` (settlement ${ids.settlementId}, structure ${ids.structureId}). Events for the campaign and everything under it show below.`,
  );

  // The first token comes with the bootstrap; every later call (a reconnect,
  // an in-band refresh before expiry) asks for a fresh one.
  let firstToken: string | undefined = ids.token;
  const herald = createHeraldClient({
    url: location.origin,
    token: async () => {
      if (firstToken !== undefined) {
        const t = firstToken;
        firstToken = undefined;
        return t;
      }
      return (await getBootstrap()).token;
    },
  });
  showStatus(herald.status);
  herald.onStatusChange((status) => {
    showStatus(status);
    log(status);
  });
  herald.onError((err) => log(err.message, true));

  // Cached until an event or a resync says otherwise.
  const queryClient = new QueryClient({ defaultOptions: { queries: { staleTime: Infinity, retry: false } } });
  showQueries(queryClient, ids.campaignId);
  const invalidator = createQueryInvalidator(queryClient, { setQueryData: true });

  const sub = herald.subscribeCampaign(ids.campaignId, {
    onEvent: (event) => {
      showEvent(event);
      void invalidator.onEvent(event);
    },
    onResync: (info) => {
      showResync(info);
      void invalidator.onResync(info);
    },
    onError: (err) => log(err.message, true),
  });
  sub.ready.then(
    () => log(`subscribed to campaign ${ids.campaignId}`),
    (err: unknown) => log(`subscribe failed: ${err instanceof Error ? err.message : String(err)}`, true),
  );
}

void main();

// A React view of a campaign that stays fresh by itself: useHeraldSubscription
// (herald-client/react) with the TanStack Query binding (herald-client/tanstack).
// Each herald event refetches the queries it concerns (a settlement_updated:
// the campaign's and the settlement's), an entity_updated's entityData is
// written into the cache without a fetch, and a reconnect that herald could
// not replay refetches the whole campaign. Queries are keyed with
// heraldQueryKeys; everything under ["campaign", id] goes with the campaign.
//
// Type-checked by `npm run typecheck` (tsc --noEmit); running it needs a
// browser, a bundler and your API behind the two fetches.

import { QueryClient, QueryClientProvider, useQuery } from "@tanstack/react-query";
import { createHeraldClient } from "herald-client";
import { HeraldProvider, useHeraldSubscription } from "herald-client/react";
import { createQueryInvalidator, heraldQueryKeys } from "herald-client/tanstack";

interface Campaign {
  id: string;
  name: string;
  worldTime: string;
}

interface Settlement {
  id: string;
  name: string;
}

async function api<T>(path: string): Promise<T> {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return (await response.json()) as T;
}

const queryClient = new QueryClient();
const herald = createHeraldClient({
  url: "http://localhost:3000",
  token: () => api<{ token: string }>("/api/herald-token").then((r) => r.token), // on every (re)connect, and before expiry
});
const invalidator = createQueryInvalidator(queryClient, { setQueryData: true });

export function CampaignView({ campaignId }: { campaignId: string }) {
  const campaign = useQuery({
    queryKey: heraldQueryKeys.campaign(campaignId),
    queryFn: () => api<Campaign>(`/api/campaigns/${campaignId}`),
  });
  const settlements = useQuery({
    queryKey: [...heraldQueryKeys.campaign(campaignId), "settlements"],
    queryFn: () => api<Settlement[]>(`/api/campaigns/${campaignId}/settlements`),
  });
  // Subscribes on mount, unsubscribes on unmount; the invalidator's handlers
  // plus one of our own.
  const live = useHeraldSubscription("campaign", campaignId, {
    ...invalidator,
    onWorldTimeChanged: (event) => console.log(`world time is now ${event.payload.newTime}`),
  });

  if (campaign.isPending) return <p>Loading…</p>;
  if (campaign.isError) return <p>Could not load the campaign: {campaign.error.message}</p>;
  return (
    <section>
      <h1>{campaign.data.name}</h1>
      <p>World time: {campaign.data.worldTime}</p>
      <ul>
        {settlements.data?.map((s) => (
          <li key={s.id}>{s.name}</li>
        ))}
      </ul>
      <small>{live.state === "error" ? `live updates off: ${live.error?.message}` : `live: ${live.state}`}</small>
    </section>
  );
}

export function App() {
  return (
    <QueryClientProvider client={queryClient}>
      <HeraldProvider client={herald}>
        <CampaignView campaignId="demo-campaign" />
      </HeraldProvider>
    </QueryClientProvider>
  );
}
